"""Terminology wired into the REST layer: definitions checked on write, TerminologyCapabilities."""

from __future__ import annotations

from typing import Any

import httpx
import orjson


def test_broken_codesystem_is_rejected_and_nothing_stored(server: Any) -> None:
    url = "https://example.uz/fhir/CodeSystem/broken-dup"
    cs = {"resourceType": "CodeSystem", "url": url, "status": "draft", "content": "complete",
          "concept": [{"code": "a", "display": "A"}, {"code": "a", "display": "again"}]}
    with httpx.Client(base_url=server.fhir, timeout=60, headers={"Content-Type": "application/fhir+json"}) as c:
        r = c.post("/CodeSystem", content=orjson.dumps(cs))
        assert r.status_code == 422, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        assert server.server.registry.resolve(url) is None
        ok = {**cs, "concept": [{"code": "a", "display": "A"}, {"code": "b", "display": "B"}]}
        assert c.post("/CodeSystem", content=orjson.dumps(ok)).status_code == 201


def test_metadata_terminology_mode(server: Any) -> None:
    r = httpx.get(server.fhir + "/metadata", params={"mode": "terminology"}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["resourceType"] == "TerminologyCapabilities"
    systems = {s.get("uri") for s in body.get("codeSystem", [])}
    assert "https://terminology.dhp.uz/fhir/core/CodeSystem/mahalla-cs" in systems
