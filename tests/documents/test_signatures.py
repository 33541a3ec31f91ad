"""Signatures: Bundle.signature verified on submit, Provenance signatures, platform countersignature."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from dhp import fhirjson
from tests.documents import fixtures as fx
from tests.documents.helpers import detached_signature, document_payload, post, search


def test_canonical_form_matches_an_independent_one() -> None:
    from dhp.documents.sign import canonical

    b = fx.form_096()
    b["id"] = "client-side-id"
    b["meta"] = {"versionId": "7"}
    assert canonical(b) == document_payload(b)
    assert b'"value":2.450' in canonical(b)


def test_valid_bundle_signature_is_accepted_and_recorded(client: httpx.Client, doc_keys: dict[str, Any]) -> None:
    b = fx.form_096()
    # JAdES-style header fields from an e-signature service (sigT) are carried, not rejected.
    b["signature"] = detached_signature(b, doc_keys["signer"], who=b["entry"][15]["fullUrl"],
                                        sigT="2026-03-02T07:06:00Z")
    r = post(client, b)
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    provs = search(client, "/Provenance", target=f"Bundle/{bid}")
    assert len(provs) == 1 and provs[0]["signature"][0]["data"] == b["signature"]["data"]
    v = client.get(f"/Bundle/{bid}/$verify-signature").json()
    params = {p["name"]: p for p in v["parameter"]}
    assert params["verified"]["valueBoolean"] is True and params["count"]["valueInteger"] == 2


def test_untrusted_or_tampered_signatures_are_refused(client: httpx.Client, doc_keys: dict[str, Any]) -> None:
    b = fx.form_096()
    b["signature"] = detached_signature(b, doc_keys["stranger"])
    r = post(client, b)
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.signature"] and "not trusted" in issue["diagnostics"]
    b = fx.form_096()
    b["signature"] = detached_signature(b, doc_keys["signer"])
    b["entry"][7]["resource"]["valueQuantity"]["value"] = fx.Decimal("3.450")  # changed after signing
    r = post(client, b)
    assert r.status_code == 422 and "does not verify" in r.json()["issue"][0]["diagnostics"]
    b = fx.form_096()
    b["signature"] = {"sigFormat": "application/jose", "data": base64.b64encode(b"not a jws").decode()}
    assert post(client, b).status_code == 422


def test_sign_countersign_and_verify_on_demand(client: httpx.Client, doc_keys: dict[str, Any]) -> None:
    b = fx.form_003()
    r = post(client, b)
    assert r.status_code == 201
    stored = r.json()
    bid = stored["id"]
    unsigned = client.get(f"/Bundle/{bid}/$verify-signature").json()
    assert {p["name"]: p for p in unsigned["parameter"]}["verified"]["valueBoolean"] is False
    # A signer's signature over the stored document (the server's id/meta are not part of the signed form).
    sig = detached_signature(stored, doc_keys["signer"])
    r = client.post(f"/Bundle/{bid}/$sign", content=fhirjson.dumps(
        {"resourceType": "Parameters", "parameter": [{"name": "signature", "valueSignature": sig}]}))
    assert r.status_code == 201, r.text
    assert r.json()["target"][0]["reference"] == f"Bundle/{bid}"
    bad = detached_signature(stored, doc_keys["stranger"])
    r = client.post(f"/Bundle/{bid}/$sign", content=fhirjson.dumps(
        {"resourceType": "Parameters", "parameter": [{"name": "signature", "valueSignature": bad}]}))
    assert r.status_code == 422
    r = client.post(f"/Bundle/{bid}/$countersign")
    assert r.status_code == 201, r.text
    counter = r.json()
    assert counter["signature"][0]["type"][0]["code"] == "1.2.840.10065.1.12.1.5"
    token = base64.b64decode(counter["signature"][0]["data"]).decode()
    assert token.count(".") == 2 and token.split(".")[1] == ""  # detached payload
    v = client.get(f"/Bundle/{bid}/$verify-signature").json()
    params = v["parameter"]
    assert params[0] == {"name": "verified", "valueBoolean": True}
    kids = {q["valueString"] for p in params if p["name"] == "signature" for q in p["part"] if q["name"] == "kid"}
    assert kids == {"signer-1", "dhp-platform-test"}
    assert client.get(f"/Bundle/{bid}/$sign").status_code == 405


def test_provenance_hook_checks_signatures(doc_server: Any, client: httpx.Client, doc_keys: dict[str, Any]) -> None:
    """``DocumentService.check_provenance`` (for crud to call on every Provenance write) verifies signatures."""
    import asyncio

    from dhp.errors import FHIRError

    r = post(client, fx.form_096())
    stored = fhirjson.loads(r.content)  # keeps 2.450 as written: the signature covers the exact digits
    svc = doc_server.server.documents
    good = {"resourceType": "Provenance", "target": [{"reference": f"Bundle/{stored['id']}"}],
            "agent": [{"who": {"display": "x"}}], "signature": [detached_signature(stored, doc_keys["signer"])]}
    bad = {**good, "signature": [detached_signature(stored, doc_keys["stranger"])]}
    # The service lives on the server's event loop (its database pool too): run the hook there.
    loop = doc_server._uv.servers[0].get_loop()

    def call(prov: dict[str, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(svc.check_provenance(prov), loop).result(60)

    assert call(good) is None
    try:
        call(bad)
    except FHIRError as e:
        assert e.status == 422 and "not trusted" in e.outcome()["issue"][0]["diagnostics"]
    else:
        raise AssertionError("an untrusted signature passed")
