"""The login and consent pages in a real browser (headless Chromium through Playwright): labels, language
switch, wrong password, sign-in, consent, redirect with a code that the token endpoint accepts.
Screenshots are kept under test-artifacts/."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.auth.conftest import PASSWORD, REDIRECT, SSO, pkce_pair

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


def test_login_and_consent_in_chromium(sso: SSO, artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright

    pat = sso.put({"resourceType": "Patient", "active": True})["id"]
    user = sso.create_user(fhir_user=f"Patient/{pat}", name="Dilnoza Rahimova")
    c = sso.create_client("patient/*.rs launch/patient openid fhirUser", public=True, redirect_uris=[REDIRECT])
    verifier, challenge = pkce_pair()
    url = httpx.URL(sso.base + "/oauth/authorize", params={
        "response_type": "code", "client_id": c["client_id"], "redirect_uri": REDIRECT,
        "scope": "launch/patient patient/*.rs openid fhirUser", "state": "browser-state", "aud": sso.fhir,
        "code_challenge": challenge, "code_challenge_method": "S256"})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(locale="ru-RU")
            page.goto(str(url))
            # Accept-Language ru → the Russian page; the fields are reachable by their labels.
            assert page.locator("html").get_attribute("lang") == "ru"
            assert page.get_by_label("Имя пользователя").is_visible()
            page.get_by_role("link", name="O‘zbekcha").click()
            assert page.locator("html").get_attribute("lang") == "uz"
            page.screenshot(path=str(artifacts / "auth-login-uz.png"), full_page=True)
            page.get_by_role("link", name="English").click()
            assert page.locator("html").get_attribute("lang") == "en"
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill("not the password")
            page.get_by_role("button", name="Sign in").click()
            alert = page.get_by_role("alert")
            assert "Wrong username or password" in alert.inner_text()
            assert page.get_by_label("Password").get_attribute("aria-invalid") == "true"
            page.screenshot(path=str(artifacts / "auth-login-error.png"), full_page=True)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Grant access").wait_for()
            assert "patient/*.rs" in page.content()
            page.screenshot(path=str(artifacts / "auth-consent-en.png"), full_page=True)
            # The redirect target does not exist: catch the navigation request instead of loading it.
            with page.expect_request(lambda r: r.url.startswith(REDIRECT)) as req:
                page.route(REDIRECT + "**", lambda route: route.fulfill(status=200, body="ok"))
                page.get_by_role("button", name="Allow").click()
            callback = req.value.url
        finally:
            browser.close()
    q = parse_qs(urlsplit(callback).query)
    assert q["state"] == ["browser-state"]
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "authorization_code", "code": q["code"][0],
                                                    "redirect_uri": REDIRECT, "client_id": c["client_id"],
                                                    "code_verifier": verifier})
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == pat
    assert (artifacts / "auth-login-uz.png").stat().st_size > 1000
