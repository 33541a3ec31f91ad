"""Submitting, keeping, indexing and splitting Form 096 and Form 003 documents over HTTP (both backends)."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from decimal import Decimal
from typing import Any

import httpx

from dhp import fhirjson
from tests.documents import fixtures as fx
from tests.documents.helpers import post, search


def _submit(client: httpx.Client, bundle: dict[str, Any]) -> dict[str, Any]:
    r = post(client, bundle)
    assert r.status_code == 201, r.text
    return r.json()


def test_form096_is_kept_byte_for_byte(client: httpx.Client, doc_server: Any) -> None:
    bundle = fx.form_096()
    # Unusual but legal formatting and decimals: the original must come back exactly as sent.
    raw = json.dumps(json.loads(fhirjson.dumps(bundle), parse_float=Decimal), indent=3, ensure_ascii=False,
                     default=str).encode("utf-8")
    raw = raw.replace(b'"value": "2.450"', b'"value": 2.450').replace(b'"value": "2.100"', b'"value": 2.100')
    assert b'"value": 2.450' in raw
    r = post(client, bundle, raw)
    assert r.status_code == 201, r.text
    stored = r.json()
    bid = stored["id"]
    assert r.headers["location"].endswith(f"/Bundle/{bid}/_history/1")
    assert stored["meta"]["versionId"] == "1" and stored["identifier"] == bundle["identifier"]
    assert stored["entry"] == json.loads(fhirjson.dumps(bundle))["entry"]
    orig = httpx.get(f"{doc_server.base}/documents/{bid}/original")
    assert orig.status_code == 200
    assert orig.content == raw
    assert orig.headers["x-content-sha256"] == hashlib.sha256(raw).hexdigest()
    got = client.get(f"/Bundle/{bid}")
    assert got.status_code == 200 and got.json()["entry"][7]["resource"]["valueQuantity"]["value"] == 2.45
    assert b'"value":2.450' in got.content


def test_resubmission_is_idempotent_and_duplicates_conflict(client: httpx.Client) -> None:
    bundle = fx.form_096()
    first = _submit(client, bundle)
    again = post(client, bundle)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"]
    changed = fx.clone(bundle)
    changed["timestamp"] = "2026-03-02T12:11:00+05:00"
    r = post(client, changed)
    assert r.status_code == 409
    issue = r.json()["issue"][0]
    assert issue["code"] == "duplicate" and first["id"] in issue["diagnostics"]
    # Only one document, one DocumentReference for that identifier.
    ident = bundle["identifier"]
    assert len(search(client, "/Bundle", identifier=f"{ident['system']}|{ident['value']}")) == 1
    assert len(search(client, "/DocumentReference", identifier=f"{ident['system']}|{ident['value']}")) == 1


def test_documents_cannot_be_changed_or_deleted(client: httpx.Client) -> None:
    stored = _submit(client, fx.form_096())
    bid = stored["id"]
    put = client.put(f"/Bundle/{bid}", content=fhirjson.dumps({**stored, "timestamp": "2026-03-03T00:00:00Z"}))
    assert put.status_code == 405
    assert put.json()["issue"][0]["details"]["coding"][0]["code"] == "document-immutable"
    assert "relatesTo" in put.json()["issue"][0]["diagnostics"]
    patch = client.patch(f"/Bundle/{bid}", content=b'[{"op":"replace","path":"/timestamp","value":"2026-01-01"}]',
                         headers={"Content-Type": "application/json-patch+json"})
    assert patch.status_code == 405
    assert client.delete(f"/Bundle/{bid}").status_code == 405
    after = client.get(f"/Bundle/{bid}").json()
    assert after["meta"]["versionId"] == "1" and after["timestamp"] == stored["timestamp"]
    # An ordinary (non-document) Bundle stays editable.
    coll = client.post("/Bundle", content=b'{"resourceType":"Bundle","type":"collection"}').json()
    assert client.delete(f"/Bundle/{coll['id']}").status_code == 204


def test_split_index_and_search_form096(client: httpx.Client) -> None:
    pinfl = "4" + str(uuid.uuid4().int)[:13]
    # The mother is already registered: the document must reuse her, not duplicate her.
    mother = fx.mother_patient(pinfl)
    existing = client.post("/Patient", content=fhirjson.dumps(mother))
    assert existing.status_code == 201, existing.text
    mother_id = existing.json()["id"]
    bundle = fx.form_096(mother_pinfl=pinfl)
    stored = _submit(client, bundle)
    bid = stored["id"]
    mothers = search(client, "/Patient", identifier=f"{fx.PINFL}|{pinfl}")
    assert [m["id"] for m in mothers] == [mother_id]
    # Birth weight of the live-born twin, found as an ordinary Observation.
    refs = search(client, "/DocumentReference", identifier=f"{bundle['identifier']['system']}|"
                                                           f"{bundle['identifier']['value']}")
    assert len(refs) == 1
    dr = refs[0]
    baby = dr["subject"]["reference"]
    assert baby.startswith("Patient/")
    weights = search(client, "/Observation", subject=baby, code="8339-4")
    assert len(weights) == 1
    assert Decimal(str(weights[0]["valueQuantity"]["value"])) == Decimal("2.450")
    raw_obs = client.get(f"/Observation/{weights[0]['id']}").content
    assert b'"value":2.450' in raw_obs
    # The APGAR series and the stillborn twin's absent score are there too.
    apgars = search(client, "/Observation", subject=baby, code="9272-6,9274-2")
    assert sorted(int(o["valueQuantity"]["value"]) for o in apgars) == [7, 9]
    absent = [o for o in search(client, "/Observation", code="9272-6", _count="500")
              if o["subject"]["reference"] != baby and o.get("dataAbsentReason")]
    assert any(o["dataAbsentReason"]["coding"][0]["code"] == "not-applicable" for o in absent)
    # Every split resource links back to its document.
    provs = search(client, "/Provenance", target=f"Observation/{weights[0]['id']}")
    assert len(provs) == 1 and provs[0]["entity"][0]["what"]["reference"] == f"Bundle/{bid}"
    targets = {t["reference"].split("/")[0] for t in provs[0]["target"]}
    assert {"Composition", "Patient", "Observation", "Encounter", "RelatedPerson"} <= targets
    assert f"Patient/{mother_id}" not in {t["reference"] for t in provs[0]["target"]}
    # A second birth at the same ward, by the same doctor: practitioner, organization and role are reused.
    roles_before = search(client, "/PractitionerRole", _count="500")
    again = fx.form_096()
    assert post(client, again).status_code == 201
    roles_after = search(client, "/PractitionerRole", _count="500")
    assert len(roles_after) == len(roles_before)
    related = [r for r in search(client, "/RelatedPerson", patient=baby)]
    assert len(related) == 1 and related[0]["patient"]["reference"] == baby
    # The DocumentReference indexes the document.
    assert dr["status"] == "current" and dr["docStatus"] == "final"
    assert dr["type"]["coding"][0]["code"] == "71230-7"
    assert any(c["code"] == "form-096" for cat in dr["category"] for c in cat["coding"])
    assert dr["content"][0]["attachment"]["url"].endswith(f"/Bundle/{bid}")
    assert dr["attester"][0]["party"]["reference"].startswith("PractitionerRole/")
    assert dr["custodian"]["reference"].startswith("Organization/")
    found = search(client, "/DocumentReference", patient=baby, type="http://loinc.org|71230-7")
    assert [d["id"] for d in found] == [dr["id"]]
    orig = client.get(f"/Bundle/{bid}").json()
    assert dr["content"][0]["attachment"]["size"] == str(len(fhirjson.dumps(bundle)))
    assert dr["content"][0]["attachment"]["hash"] == base64.b64encode(
        hashlib.sha1(fhirjson.dumps(bundle)).digest()).decode()
    assert orig["id"] == bid
    # Bundle search through the embedded Composition.
    cat = f"{fx.FORM_CS}|form-096"
    by_cat = {b["id"] for b in search(client, "/Bundle", type="document", **{"composition.category": cat,
                                                                              "_count": "500"})}
    assert bid in by_cat
    comp_ident = bundle["entry"][0]["resource"]["identifier"][0]
    by_ident = search(client, "/Bundle", **{"composition.identifier": f"{comp_ident['system']}|{comp_ident['value']}"})
    assert [b["id"] for b in by_ident] == [bid]
    assert search(client, "/Bundle", **{"composition.identifier": f"{comp_ident['system']}|nope"}) == []
    assert bid in {b["id"] for b in search(client, "/Bundle", timestamp="2026-03-02", _count="500")}
    # The newborn arrived as a urn:uuid inside the document; the chain reaches the Patient it was split into.
    assert bid in {b["id"] for b in search(client, "/Bundle", **{"composition.patient": baby, "_count": "500"})}
    baby_res = client.get(f"/{baby}").json()
    if baby_res.get("name"):
        family = baby_res["name"][0].get("family")
        if family:
            chained = search(client, "/Bundle", **{"composition.patient:Patient.family": family, "_count": "500"})
            assert bid in {b["id"] for b in chained}


def test_form003_inpatient_stay(client: httpx.Client) -> None:
    bundle = fx.form_003()
    stored = _submit(client, bundle)
    ident = bundle["identifier"]
    dr = search(client, "/DocumentReference", identifier=f"{ident['system']}|{ident['value']}")[0]
    patient = dr["subject"]["reference"]
    assert dr["context"][0]["reference"].startswith("Encounter/")
    assert [d["id"] for d in search(client, "/DocumentReference", patient=patient, type="34105-7")] == [dr["id"]]
    conds = search(client, "/Condition", subject=patient)
    assert sorted(c["code"]["coding"][0]["code"] for c in conds) == ["K35.8", "R10.3"]
    assert all(c["encounter"]["reference"] == dr["context"][0]["reference"] for c in conds)
    procs = search(client, "/Procedure", subject=patient)
    assert len(procs) == 1 and procs[0]["code"]["coding"][0]["code"] == "80146002"
    assert procs[0]["reason"][0]["reference"]["reference"] in {f"Condition/{c['id']}" for c in conds}
    assert search(client, "/Bundle", **{"composition.category": f"{fx.FORM_CS}|form-003", "_count": "500"})
    comp = client.get(f"/Composition?identifier={bundle['entry'][0]['resource']['identifier'][0]['value']}")
    assert comp.status_code == 200 and comp.json()["entry"][0]["resource"]["subject"][0]["reference"] == patient
    assert stored["entry"][0]["resource"]["meta"]["profile"][0].endswith(
        "form-003-inpatient-medical-record-composition")


def test_document_inside_a_transaction(client: httpx.Client) -> None:
    good, bad = fx.form_096(), fx.form_096()
    del bad["entry"][0]["resource"]["attester"]
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:4b7c1f2e-0a5d-4c1e-9d6b-1f0e2d3c4b5a", "resource": good,
         "request": {"method": "POST", "url": "Bundle"}},
        {"resource": {"resourceType": "Basic", "code": {"text": "note"}}, "request": {"method": "POST", "url": "Basic"}},
    ]}
    r = client.post("", content=fhirjson.dumps(tx))
    assert r.status_code == 200, r.text
    loc = r.json()["entry"][0]["response"]["location"]
    bid = loc.split("/")[1]
    assert client.get(f"/Bundle/{bid}").json()["type"] == "document"
    assert search(client, "/DocumentReference", identifier=f"{good['identifier']['system']}|"
                                                           f"{good['identifier']['value']}")
    tx["entry"][0]["resource"] = bad
    r = client.post("", content=fhirjson.dumps(tx))
    assert r.status_code == 422
    assert "Bundle.entry[0]" in r.json()["issue"][0]["diagnostics"]
    assert search(client, "/Bundle", identifier=f"{bad['identifier']['system']}|{bad['identifier']['value']}") == []
