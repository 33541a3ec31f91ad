"""$validate (type and instance level) and 422 on write, over real HTTP against real servers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.validation.conftest import UZ

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _ids(outcome: dict[str, Any], severity: tuple[str, ...] = ("error", "fatal")) -> list[str]:
    return [i["details"]["coding"][0]["code"] for i in outcome.get("issue", [])
            if i["severity"] in severity and i.get("details", {}).get("coding")]


def test_type_level_validate_ok(server: Any, david: dict[str, Any]) -> None:
    r = httpx.post(f"{server.fhir}/Patient/$validate", json=david, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert _ids(body) == []


def test_type_level_validate_reports_errors_with_paths(server: Any, david: dict[str, Any]) -> None:
    bad = copy.deepcopy(david)
    del bad["identifier"]
    bad["birthDate"] = "2020-13-01"
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": bad}]}
    r = httpx.post(f"{server.fhir}/Patient/$validate", json=params, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 200
    issues = r.json()["issue"]
    by_id = {i["details"]["coding"][0]["code"]: i for i in issues if i.get("details", {}).get("coding")}
    assert by_id["cardinality-min"]["expression"] == ["Patient.identifier"]
    assert by_id["primitive-format"]["expression"] == ["Patient.birthDate"]
    assert by_id["cardinality-min"]["severity"] == "error"


def test_validate_with_profile_parameter(server: Any) -> None:
    plain = {"resourceType": "Patient", "name": [{"family": "Karimov"}]}
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": plain}, {"name": "mode", "valueCode": "profile"},
        {"name": "profile", "valueUri": UZ + "uz-core-patient"}]}
    r = httpx.post(f"{server.fhir}/Patient/$validate", json=params, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 200
    assert "cardinality-min" in _ids(r.json())
    params["parameter"][2]["valueUri"] = "http://hl7.org/fhir/StructureDefinition/Patient"
    r = httpx.post(f"{server.fhir}/Patient/$validate", json=params, headers=FHIR_JSON, timeout=60)
    assert _ids(r.json()) == []


def test_validate_bad_mode_is_400(server: Any, david: dict[str, Any]) -> None:
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": david},
                                                         {"name": "mode", "valueCode": "bogus"}]}
    r = httpx.post(f"{server.fhir}/Patient/$validate", json=params, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"


def test_validate_type_mismatch_is_400(server: Any, david: dict[str, Any]) -> None:
    r = httpx.post(f"{server.fhir}/Observation/$validate", json=david, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 400


def test_instance_level_validate(server: Any, david: dict[str, Any]) -> None:
    # the default server does not validate on write, so a non-conformant Patient can be stored
    plain = {"resourceType": "Patient", "name": [{"family": "Stored"}]}
    created = httpx.post(f"{server.fhir}/Patient", json=plain, headers=FHIR_JSON, timeout=60)
    assert created.status_code == 201, created.text
    pid = created.headers["Location"].split("/Patient/")[1].split("/")[0]
    r = httpx.get(f"{server.fhir}/Patient/{pid}/$validate", headers=FHIR_JSON, timeout=60)
    assert r.status_code == 200
    assert "cardinality-min" in _ids(r.json())  # uz-core-patient is the default profile
    r = httpx.get(f"{server.fhir}/Patient/{pid}/$validate?mode=delete", headers=FHIR_JSON, timeout=60)
    assert r.status_code == 200 and _ids(r.json()) == []
    r = httpx.get(f"{server.fhir}/Patient/does-not-exist/$validate", headers=FHIR_JSON, timeout=60)
    assert r.status_code == 404


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def strict_server(request: pytest.FixtureRequest, start_server: Callable[..., Any],
                  new_db_url: Callable[[str], str]) -> Any:
    return start_server(DHP_DATABASE_URL=new_db_url(request.param), DHP_AUTH="off", DHP_VALIDATION="strict",
                        DHP_PACKAGE_IMPORT="ig")


def test_write_of_nonconformant_resource_is_422(strict_server: Any, david: dict[str, Any]) -> None:
    bad = copy.deepcopy(david)
    del bad["identifier"]
    r = httpx.post(f"{strict_server.fhir}/Patient", json=bad, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "cardinality-min" in _ids(body)
    hit = next(i for i in body["issue"] if i.get("expression") == ["Patient.identifier"])
    assert hit["severity"] == "error"


def test_write_of_conformant_resource_is_accepted(strict_server: Any, david: dict[str, Any]) -> None:
    r = httpx.post(f"{strict_server.fhir}/Patient", json=david, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 201, r.text


def test_write_error_carries_source_position(strict_server: Any) -> None:
    body = b'{\n  "resourceType": "Patient",\n  "meta": {"profile": ["' + (UZ + "uz-core-patient").encode() + \
        b'"]},\n  "active": "yes"\n}'
    r = httpx.post(f"{strict_server.fhir}/Patient", content=body, headers=FHIR_JSON, timeout=60)
    assert r.status_code == 422
    hit = next(i for i in r.json()["issue"] if i.get("expression") == ["Patient.active"])
    exts = {e["url"].rsplit("-", 1)[1]: e["valueInteger"] for e in hit.get("extension", [])}
    assert exts == {"line": 4, "col": 3}
