"""Composition/[id]/$document: a document assembled from stored resources, optionally persisted."""

from __future__ import annotations

import httpx

from dhp import fhirjson
from tests.documents import fixtures as fx
from tests.documents.helpers import search


def _create(client: httpx.Client, resource: dict) -> str:
    r = client.post(f"/{resource['resourceType']}", content=fhirjson.dumps(resource))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_document_from_stored_resources(client: httpx.Client) -> None:
    org = _create(client, fx.organization("309876543"))
    prac = _create(client, fx.practitioner("7707198800111"))
    role = _create(client, fx.practitioner_role(f"Practitioner/{prac}", f"Organization/{org}"))
    pat = fx.mother_patient("52711985000017")
    pat["name"][0]["text"] = "Qodirova Nilufar"
    pid = _create(client, pat)
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": fx.LOINC, "code": "8310-5", "display": "Body temperature"}]},
           "subject": {"reference": f"Patient/{pid}"},
           "valueQuantity": {"value": fx.Decimal("37.20"), "unit": "Cel", "system": fx.UCUM, "code": "Cel"}}
    oid = _create(client, obs)
    comp = {"resourceType": "Composition", "identifier": [{"system": "https://example.uz/notes", "value": pid}],
            "status": "final", "type": {"coding": [{"system": fx.LOINC, "code": "11488-4", "display": "Consult note"}]},
            "subject": [{"reference": f"Patient/{pid}"}], "date": "2026-04-01T10:00:00+05:00",
            "author": [{"reference": f"PractitionerRole/{role}"}], "title": "Konsultatsiya",
            "custodian": {"reference": f"Organization/{org}"},
            "attester": [{"mode": {"coding": [{"system": "http://hl7.org/fhir/composition-attestation-mode",
                                               "code": "professional"}]}, "party": {"reference": f"PractitionerRole/{role}"}}],
            "section": [{"title": "Harorat", "entry": [{"reference": f"Observation/{oid}"}]}]}
    cid = _create(client, comp)
    r = client.get(f"/Composition/{cid}/$document")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["type"] == "document" and doc["entry"][0]["resource"]["id"] == cid
    urls = {e["fullUrl"].split("/fhir/", 1)[1] for e in doc["entry"]}
    assert {f"Patient/{pid}", f"Observation/{oid}", f"PractitionerRole/{role}", f"Organization/{org}",
            f"Practitioner/{prac}"} <= urls
    div = doc["entry"][0]["resource"]["section"][0]["text"]["div"]
    assert "37.20 Cel" in div
    assert b'"value":37.20' in r.content
    before = len(search(client, "/Patient", identifier=f"{fx.PINFL}|52711985000017"))
    r = client.post(f"/Composition/{cid}/$document", params={"persist": "true"})
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    assert r.headers["location"].endswith(f"/Bundle/{bid}/_history/1")
    assert client.get(f"/Bundle/{bid}").json()["type"] == "document"
    # Persisting links the stored resources; it does not copy them.
    assert len(search(client, "/Patient", identifier=f"{fx.PINFL}|52711985000017")) == before == 1
    drs = search(client, "/DocumentReference", patient=f"Patient/{pid}")
    assert len(drs) == 1 and drs[0]["content"][0]["attachment"]["url"].endswith(f"/Bundle/{bid}")
    assert client.get(f"/Composition/{cid}/$document", params={"persist": "true"}).status_code == 405
    assert client.get("/Composition/nope/$document").status_code == 404
