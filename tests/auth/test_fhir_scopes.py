"""SMART scopes enforced inside the FHIR API: interactions (cruds), resource types, the patient compartment of
patient/ tokens and granular query-restricted scopes, on reads, searches and writes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.auth.conftest import REDIRECT, SSO, login_and_consent

FJ = "application/fhir+json"


def token_for(sso: SSO, scopes: str) -> str:
    c = sso.create_client(scopes)
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def h(tok: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + tok, "Accept": FJ, "Content-Type": FJ}


def obs(patient: str, category: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": f"Patient/{patient}"}}


@pytest.fixture(scope="module")
def world(sso: SSO) -> dict[str, Any]:
    me = sso.put({"resourceType": "Patient", "active": True, "name": [{"family": "Me"}]})["id"]
    other = sso.put({"resourceType": "Patient", "active": True, "name": [{"family": "Other"}]})["id"]
    return {
        "me": me, "other": other,
        "my_lab": sso.put(obs(me, "laboratory"))["id"],
        "my_vitals": sso.put(obs(me, "vital-signs"))["id"],
        "other_lab": sso.put(obs(other, "laboratory"))["id"],
    }


def patient_token(sso: SSO, patient: str, scope: str) -> str:
    user = sso.create_user(fhir_user=f"Patient/{patient}")
    c = sso.create_client(scope + " launch/patient", redirect_uris=[REDIRECT])
    q = login_and_consent(sso, c["client_id"], user, scope=scope)
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "authorization_code", "code": q["code"][0],
                                                    "redirect_uri": REDIRECT, **c})
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == patient
    return str(r.json()["access_token"])


def test_system_scope_per_interaction(sso: SSO, world: dict[str, Any]) -> None:
    read_only = token_for(sso, "system/Observation.r")
    assert httpx.get(f"{sso.fhir}/Observation/{world['my_lab']}", headers=h(read_only)).status_code == 200
    r = httpx.post(f"{sso.fhir}/Observation", json=obs(world["me"], "laboratory"), headers=h(read_only))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{sso.fhir}/Patient/{world['me']}", headers=h(read_only)).status_code == 403
    writer = token_for(sso, "system/Observation.cu")
    r = httpx.post(f"{sso.fhir}/Observation", json=obs(world["me"], "laboratory"), headers=h(writer))
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{sso.fhir}/Observation/{r.json()['id']}", headers=h(writer)).status_code == 403
    assert httpx.get(f"{sso.fhir}/Observation/{r.json()['id']}", headers=h(writer)).status_code == 403


def test_search_needs_the_s_permission(sso: SSO, world: dict[str, Any]) -> None:
    read_only = token_for(sso, "system/Observation.r")
    assert httpx.get(f"{sso.fhir}/Observation", headers=h(read_only)).status_code == 403
    searcher = token_for(sso, "system/Observation.s")
    r = httpx.get(f"{sso.fhir}/Observation", headers=h(searcher))
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"


def test_patient_token_sees_only_its_compartment(sso: SSO, world: dict[str, Any]) -> None:
    tok = patient_token(sso, world["me"], "patient/*.rs")
    assert httpx.get(f"{sso.fhir}/Observation/{world['my_lab']}", headers=h(tok)).status_code == 200
    r = httpx.get(f"{sso.fhir}/Observation/{world['other_lab']}", headers=h(tok))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{sso.fhir}/Patient/{world['other']}", headers=h(tok)).status_code == 403
    r = httpx.get(f"{sso.fhir}/Observation", headers=h(tok))
    assert r.status_code == 200, r.text
    ids = {e["resource"]["id"] for e in r.json().get("entry", [])}
    assert {world["my_lab"], world["my_vitals"]} <= ids and world["other_lab"] not in ids
    # No write permission in the scope.
    assert httpx.post(f"{sso.fhir}/Observation", json=obs(world["me"], "laboratory"), headers=h(tok)).status_code == 403


def test_patient_write_scope_stays_in_the_compartment(sso: SSO, world: dict[str, Any]) -> None:
    tok = patient_token(sso, world["me"], "patient/Observation.cruds")
    assert httpx.post(f"{sso.fhir}/Observation", json=obs(world["me"], "survey"), headers=h(tok)).status_code == 201
    r = httpx.post(f"{sso.fhir}/Observation", json=obs(world["other"], "survey"), headers=h(tok))
    assert r.status_code == 403


def test_granular_scope_on_reads_and_searches(sso: SSO, world: dict[str, Any]) -> None:
    tok = patient_token(sso, world["me"], "patient/Observation.rs?category=laboratory")
    assert httpx.get(f"{sso.fhir}/Observation/{world['my_lab']}", headers=h(tok)).status_code == 200
    assert httpx.get(f"{sso.fhir}/Observation/{world['my_vitals']}", headers=h(tok)).status_code == 403
    r = httpx.get(f"{sso.fhir}/Observation", headers=h(tok))
    assert r.status_code == 200, r.text
    ids = {e["resource"]["id"] for e in r.json().get("entry", [])}
    assert world["my_lab"] in ids and world["my_vitals"] not in ids and world["other_lab"] not in ids


def test_metadata_and_discovery_stay_public(sso: SSO) -> None:
    assert httpx.get(sso.fhir + "/metadata", headers={"Accept": FJ}).status_code == 200
    assert httpx.get(sso.fhir + "/.well-known/smart-configuration").status_code == 200


def _search_parameter(code: str) -> dict[str, Any]:
    return {"resourceType": "SearchParameter", "url": f"http://dhp.test/fhir/SearchParameter/{code}",
            "name": code, "status": "active", "description": "d", "code": code, "base": ["Patient"],
            "type": "token", "expression": "Patient.gender"}


@pytest.mark.parametrize("rtype", ["SearchParameter", "StructureDefinition", "ValueSet", "CompartmentDefinition"])
def test_conformance_writes_need_the_admin_scope(sso: SSO, rtype: str) -> None:
    """A token with every resource scope but not dhp/admin may read and search conformance resources, not
    write them: a SearchParameter or CompartmentDefinition changes what every client finds and may access."""
    vendor = token_for(sso, "system/*.cruds")
    body = _search_parameter("vendor-x") if rtype == "SearchParameter" else {
        "resourceType": rtype, "url": f"http://dhp.test/fhir/{rtype}/v", "status": "draft"}
    r = httpx.post(f"{sso.fhir}/{rtype}", json=body, headers=h(vendor))
    assert r.status_code == 403, r.text
    assert "dhp/admin" in r.text
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": body, "request": {"method": "POST", "url": rtype}}]}
    assert httpx.post(sso.fhir, json=tx, headers=h(vendor)).status_code == 403
    assert httpx.get(f"{sso.fhir}/{rtype}", headers=h(vendor)).status_code == 200  # reading stays open


def test_the_admin_scope_writes_and_deletes_a_search_parameter(sso: SSO) -> None:
    admin = token_for(sso, "system/*.cruds dhp/admin")
    vendor = token_for(sso, "system/*.cruds")
    r = httpx.post(f"{sso.fhir}/SearchParameter", json=_search_parameter("admin-x"), headers=h(admin))
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert httpx.delete(f"{sso.fhir}/SearchParameter/{sid}", headers=h(vendor)).status_code == 403
    assert httpx.delete(f"{sso.fhir}/SearchParameter/{sid}", headers=h(admin)).status_code in (200, 204)


def test_content_canonical_resources_need_no_admin_scope(sso: SSO) -> None:
    """Questionnaires are canonical resources too, but content: the national platform lets clients write them."""
    vendor = token_for(sso, "system/*.cruds")
    q = {"resourceType": "Questionnaire", "url": "http://dhp.test/fhir/Questionnaire/intake", "status": "draft"}
    assert httpx.post(f"{sso.fhir}/Questionnaire", json=q, headers=h(vendor)).status_code == 201
