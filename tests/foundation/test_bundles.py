"""batch and transaction Bundles over HTTP on both backends."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

FJ = "application/fhir+json"


@pytest.fixture(scope="module")
def client(server: Any) -> httpx.Client:
    with httpx.Client(base_url=server.fhir, headers={"Content-Type": FJ, "Accept": FJ}, timeout=60) as c:
        yield c


def post_body(bundle: dict[str, Any]) -> bytes:
    from dhp import fhirjson

    return fhirjson.dumps(bundle)


def post(client: httpx.Client, bundle: dict[str, Any]) -> httpx.Response:
    return client.post("", content=post_body(bundle))


def test_transaction_rewrites_urn_uuid_and_orders(client: httpx.Client) -> None:
    pu, eu = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    existing = client.post("/Patient", content=b'{"resourceType":"Patient","active":true}').json()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": eu, "resource": {"resourceType": "Encounter", "status": "completed",
                                     "subject": {"reference": pu}},
         "request": {"method": "POST", "url": "Encounter"}},
        {"fullUrl": pu, "resource": {"resourceType": "Patient", "name": [{"family": "Rahimova"}],
                                     "extension": [{"url": "http://example.org/w", "valueDecimal": Decimal("3.10")}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "w"},
                      "subject": {"reference": pu}, "encounter": {"reference": eu},
                      "valueQuantity": {"value": Decimal("3.250"), "unit": "kg"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": f"Patient/{existing['id']}"}},
        {"request": {"method": "GET", "url": f"Patient/{existing['id']}/_history/1"}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 200, r.text
    assert '"valueDecimal":3.10' in r.text and '"value":3.250' in r.text
    body = r.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses[:3] == ["201 Created"] * 3 and statuses[3].startswith("20")
    pat_loc = body["entry"][1]["response"]["location"]
    pid = pat_loc.split("/")[1]
    obs = client.get("/" + body["entry"][2]["response"]["location"].rsplit("/_history", 1)[0]).json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"
    enc_id = body["entry"][0]["response"]["location"].split("/")[1]
    assert obs["encounter"]["reference"] == f"Encounter/{enc_id}"
    assert client.get(f"/Patient/{existing['id']}").status_code == 410


def test_transaction_get_sees_the_transactions_writes(client: httpx.Client) -> None:
    # GETs run last in a transaction: a read of a resource the transaction updates returns the new version.
    rid = "txget-" + uuid.uuid4().hex[:10]
    assert client.put(f"/Patient/{rid}", content=b'{"resourceType":"Patient","id":"%s","active":true}'
                      % rid.encode()).status_code == 201
    gone = client.post("/Patient", content=b'{"resourceType":"Patient"}').json()["id"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{rid}"}},
        {"resource": {"resourceType": "Patient", "id": rid, "active": False, "gender": "female"},
         "request": {"method": "PUT", "url": f"Patient/{rid}"}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 200, r.text
    got = r.json()["entry"][0]
    assert got["resource"]["gender"] == "female" and got["resource"]["meta"]["versionId"] == "2"
    assert got["response"]["etag"] == 'W/"2"'
    # A resource the transaction deletes is gone for its GET: the whole transaction fails, nothing is written.
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": f"Patient/{gone}"}},
        {"resource": {"resourceType": "Patient", "id": rid, "active": True},
         "request": {"method": "PUT", "url": f"Patient/{rid}"}},
        {"request": {"method": "GET", "url": f"Patient/{gone}"}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 410, r.text
    assert client.get(f"/Patient/{gone}").status_code == 200
    assert client.get(f"/Patient/{rid}").json()["meta"]["versionId"] == "2"


def test_prefer_operation_outcome_gives_each_write_entry_an_outcome(client: httpx.Client) -> None:
    for kind in ("transaction", "batch"):
        bundle = {"resourceType": "Bundle", "type": kind, "entry": [
            {"resource": {"resourceType": "Patient", "active": True}, "request": {"method": "POST", "url": "Patient"}},
        ]}
        r = client.post("", content=post_body(bundle), headers={"Prefer": "return=OperationOutcome"})
        assert r.status_code == 200, r.text
        entry = r.json()["entry"][0]
        assert "resource" not in entry
        assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"
        assert entry["response"]["status"] == "201 Created"


def test_transaction_rewrites_links_not_data_equal_to_a_full_url(client: httpx.Client) -> None:
    # The spec's rewrite covers references, uri-typed elements and narrative links; a string element holding
    # the same text (an identifier's value, a valueString) is data and must come back as posted.
    pu = f"urn:uuid:{uuid.uuid4()}"
    div = f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{pu}">the patient</a></div>'
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pu, "resource": {"resourceType": "Patient", "text": {"status": "generated", "div": div},
                                     "identifier": [{"system": "urn:ietf:rfc:3986", "value": pu}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "w"},
                      "subject": {"reference": pu},
                      "extension": [{"url": "http://example.org/s", "valueString": pu},
                                    {"url": "http://example.org/u", "valueUri": pu}]},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 200, r.text
    locs = [e["response"]["location"].rsplit("/_history", 1)[0] for e in r.json()["entry"]]
    pat, obs = (client.get("/" + loc).json() for loc in locs)
    assert pat["identifier"][0]["value"] == pu
    assert f'href="{locs[0]}"' in pat["text"]["div"]
    assert obs["subject"]["reference"] == locs[0]
    assert {x["url"]: x.get("valueString", x.get("valueUri")) for x in obs["extension"]} == {
        "http://example.org/s": pu, "http://example.org/u": locs[0]}


def test_transaction_is_all_or_nothing(client: httpx.Client) -> None:
    p = client.post("/Patient", content=b'{"resourceType":"Patient","active":true}').json()
    fam = "Atomic" + uuid.uuid4().hex[:6]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": fam}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**p, "active": False}, "request": {"method": "PUT", "url": f"Patient/{p['id']}"}},
        {"resource": {"resourceType": "Patient", "id": "x"},
         "request": {"method": "PUT", "url": "Patient/y"}},  # id mismatch → fails
    ]}
    r = post(client, bundle)
    assert r.status_code == 400
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[2]" in oo["issue"][0]["diagnostics"]
    # the update and the create were rolled back
    cur = client.get(f"/Patient/{p['id']}").json()
    assert cur["meta"]["versionId"] == "1" and cur["active"] is True
    hist = client.get("/Patient/_history", params={"_count": 200}).json()
    assert not any(e.get("resource", {}).get("name", [{}])[0].get("family") == fam for e in hist["entry"])


def test_transaction_version_conflict_rolls_back(client: httpx.Client) -> None:
    p = client.post("/Patient", content=b'{"resourceType":"Patient","active":true}').json()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "t"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {**p, "active": False},
         "request": {"method": "PUT", "url": f"Patient/{p['id']}", "ifMatch": 'W/"5"'}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 412
    assert client.get(f"/Patient/{p['id']}").json()["active"] is True


def test_transaction_conditional_create_and_reference(client: httpx.Client) -> None:
    p = client.post("/Patient", content=b'{"resourceType":"Patient","active":true}').json()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"_id={p['id']}"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "c"},
                      "subject": {"reference": f"Patient?_id={p['id']}"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 200, r.text
    first = r.json()["entry"][0]["response"]
    assert first["status"] == "200 OK" and first["location"].startswith(f"Patient/{p['id']}/")
    oid = r.json()["entry"][1]["response"]["location"].split("/")[1]
    assert client.get(f"/Observation/{oid}").json()["subject"]["reference"] == f"Patient/{p['id']}"
    missing = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "c"},
                      "subject": {"reference": "Patient?_id=nobody-has-this"}},
         "request": {"method": "POST", "url": "Observation"}}]}
    assert post(client, missing).status_code == 404


def test_batch_entries_are_independent(client: httpx.Client) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "active": True}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/not-there"}},
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/b"}},
        {"request": {"method": "GET", "url": "metadata-not-a-type/1"}},
    ]}
    r = post(client, bundle)
    assert r.status_code == 200
    es = r.json()["entry"]
    assert r.json()["type"] == "batch-response"
    assert es[0]["response"]["status"] == "201 Created"
    assert es[1]["response"]["status"] == "404"
    assert es[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert es[2]["response"]["status"] == "400"
    assert es[3]["response"]["status"] == "404"
    created = es[0]["response"]["location"].rsplit("/_history", 1)[0]
    assert client.get("/" + created).status_code == 200


def test_bad_bundles(client: httpx.Client) -> None:
    for bad in (
        {"resourceType": "Bundle", "type": "collection"},
        {"resourceType": "Patient"},
        {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {"resourceType": "Patient"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "FETCH", "url": "Patient"}}]},
        {"resourceType": "Bundle", "type": "transaction", "entry": "nope"},
    ):
        r = post(client, bad)
        assert r.status_code in (400, 422), (bad, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    dup = f"urn:uuid:{uuid.uuid4()}"
    r = post(client, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": dup, "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": dup, "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
    ]})
    assert r.status_code == 400
