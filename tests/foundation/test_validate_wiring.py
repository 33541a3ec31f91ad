"""$validate over HTTP reports where in the posted JSON each problem is (line/column)."""

from __future__ import annotations

from typing import Any

import httpx

LINE_EXT = "http://hl7.org/fhir/StructureDefinition/operationoutcome-issue-line"


def test_validate_reports_source_line(server: Any) -> None:
    body = b'{\n  "resourceType": "Patient",\n  "birthDate": "17.05.1990"\n}'
    r = httpx.post(server.fhir + "/Patient/$validate", content=body,
                   headers={"Content-Type": "application/fhir+json"}, timeout=60)
    assert r.status_code == 200, r.text
    issues = r.json()["issue"]
    bad = [i for i in issues if i["severity"] == "error" and "birthDate" in " ".join(i.get("expression", []))]
    assert bad, issues
    lines = [e.get("valueInteger") for e in bad[0].get("extension", []) if e["url"] == LINE_EXT]
    assert lines == [3]
