"""The human-readable document: HTML in uz/ru/en over the FHIR API and /documents/{id}, shown in Chromium."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from dhp.documents.render import generated_div, pick_language, sanitize
from tests.documents import fixtures as fx
from tests.documents.helpers import post

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def test_language_choice() -> None:
    assert pick_language("ru-RU,ru;q=0.9,en;q=0.8") == "ru"
    assert pick_language("de, en;q=0.5") == "en"
    assert pick_language("fr") == "uz" and pick_language(None) == "uz"
    assert pick_language("uz;q=0.2, ru;q=0.7") == "ru"


def test_narrative_is_sanitized() -> None:
    dirty = ('<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="steal()">Hi<script>alert(1)</script></p>'
             '<a href="javascript:x()">x</a><img src="https://pacs.example/i.png" onerror="x()"/></div>')
    clean = str(sanitize(dirty))
    assert "script" not in clean and "onclick" not in clean and "javascript" not in clean and "onerror" not in clean
    assert "<p>Hi</p>" in clean and 'src="https://pacs.example/i.png"' in clean


def test_generated_narrative_for_sections_without_text() -> None:
    b = fx.form_096()
    entries = [e["resource"] for e in b["entry"][7:14]]
    div = generated_div(entries, None, "en")
    assert "Birth weight Measured: 2.450 kg" in div and "data absent" in div
    assert div.startswith('<div xmlns="http://www.w3.org/1999/xhtml"><ul>')


def test_html_in_three_languages(client: httpx.Client, doc_server: Any) -> None:
    r = post(client, fx.form_003())
    assert r.status_code == 201
    bid = r.json()["id"]
    pages = {}
    for lang in ("uz", "ru", "en"):
        h = client.get(f"/Bundle/{bid}", headers={"Accept": "text/html", "Accept-Language": lang})
        assert h.status_code == 200, h.text
        assert h.headers["content-type"].startswith("text/html")
        pages[lang] = h.text
        assert f'<html lang="{lang}">' in h.text
    assert "Holati" in pages["uz"] and "Статус" in pages["ru"] and "Status" in pages["en"]
    # Section titles of Form 003 come from the code system's designations in ru/en.
    assert "Диагнозы" in pages["ru"] and "Diagnoses" in pages["en"] and "Tashxislar" in pages["uz"]
    assert "K35.8" in pages["en"] and "Appendectomy" in pages["en"]
    assert "<script" not in pages["en"]
    assert client.get(f"/Bundle/{bid}", params={"_format": "html"}).headers["content-type"].startswith("text/html")
    page = httpx.get(f"{doc_server.base}/documents/{bid}", params={"_language": "ru"})
    assert page.status_code == 200 and '<html lang="ru">' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert httpx.get(f"{doc_server.base}/documents/nope").status_code == 404
    coll = client.post("/Bundle", content=b'{"resourceType":"Bundle","type":"collection"}').json()
    assert client.get(f"/Bundle/{coll['id']}", headers={"Accept": "text/html"}).status_code == 406


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")
def test_document_in_chromium(client: httpx.Client, doc_server: Any, artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright

    r = post(client, fx.form_096())
    assert r.status_code == 201
    bid = r.json()["id"]
    r = post(client, fx.form_003())
    assert r.status_code == 201
    bid003 = r.json()["id"]
    backend = "pg" if doc_server.server.store.url.startswith("postgresql") else "sqlite"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1400}, locale="en-US")
            resp = page.goto(f"{doc_server.base}/documents/{bid}?_language=en")
            assert resp is not None and resp.status == 200
            assert page.locator("h1").inner_text() == "Tug'ilish haqida tibbiy guvohnoma (096-shakl)"
            assert page.locator("main").get_attribute("aria-labelledby") == "doc-title"
            headings = page.locator("section h2").all_inner_texts()
            assert headings == ["Yangi tug'ilganlar", "Ona", "Tug'ruq", "O'lchovlar va Apgar shkalasi"]
            text = page.locator("main").inner_text()
            assert "Birth weight Measured: 2.450 kg" in text and "Egizaklar" in text
            assert "Form 096" in text and "deceased" in text
            page.screenshot(path=str(artifacts / f"document-form096-{backend}.png"), full_page=True)
            page.goto(f"{doc_server.base}/documents/{bid}?_language=ru")
            assert page.locator("html").get_attribute("lang") == "ru"
            assert "Статус" in page.locator("dl.meta").inner_text()
            page.goto(f"{doc_server.base}/documents/{bid003}?_language=ru")
            assert page.locator("section h2").all_inner_texts()[:2] == ["Поступление", "Диагнозы"]
            assert "K35.8" in page.locator("main").inner_text()
            page.screenshot(path=str(artifacts / f"document-form003-ru-{backend}.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts / f"document-form096-{backend}.png").stat().st_size > 10_000
