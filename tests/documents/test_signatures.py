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
    assert provs[0]["signature"][0]["who"]["reference"].startswith("PractitionerRole/")
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


def test_key_configuration_errors_are_clear(tmp_path: Any) -> None:
    import pytest

    from dhp.documents.service import DocumentService
    from dhp.settings import Settings

    class Fake:
        settings = Settings.from_env({}, document_trusted_keys=str(tmp_path / "missing.json"))

    with pytest.raises(RuntimeError, match="DHP_DOCUMENT_TRUSTED_KEYS"):
        DocumentService(Fake())  # type: ignore[arg-type]
    (tmp_path / "bad.pem").write_text("not a key")

    class Fake2:
        settings = Settings.from_env({}, document_signing_key=str(tmp_path / "bad.pem"))

    with pytest.raises(RuntimeError, match="DHP_DOCUMENT_SIGNING_KEY"):
        DocumentService(Fake2())  # type: ignore[arg-type]


def _cert(subject: str, issuer: str, key: Any, issuer_key: Any, ca: bool) -> Any:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def test_x5c_certificate_from_a_trust_anchor(tmp_path: Any) -> None:
    """A signer unknown by kid is trusted through its certificate when a configured CA issued it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from joserfc import jws
    from joserfc.jwk import ECKey

    from dhp.documents.sign import Keys, SignatureError

    ca_key, other_ca_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("E-IMZO test CA", "E-IMZO test CA", ca_key, ca_key, True)
    leaf = _cert("Dr Karimova", "E-IMZO test CA", leaf_key, ca_key, False)
    forged = _cert("Dr Karimova", "E-IMZO test CA", leaf_key, other_ca_key, False)  # same names, wrong issuer key
    (tmp_path / "anchors.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    keys = Keys(trust_anchors=str(tmp_path / "anchors.pem"))
    payload = document_payload(fx.form_003())
    jwk = ECKey.import_key(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))

    def sig_with(cert: Any) -> dict[str, Any]:
        der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        registry = jws.JWSRegistry()
        registry.max_header_length = 8192  # a certificate does not fit joserfc's 512-byte default
        token = jws.serialize_compact({"alg": "ES256", "x5c": [der]}, payload, jwk, registry=registry)
        h, _, s = token.split(".")
        return {"sigFormat": "application/jose", "data": base64.b64encode(f"{h}..{s}".encode()).decode()}

    assert keys.verify(sig_with(leaf), payload)["alg"] == "ES256"
    for bad, why in ((sig_with(forged), "not issued"), (sig_with(ca), None)):
        try:
            keys.verify(bad, payload)
        except SignatureError as e:
            assert why is None or why in str(e)
        else:
            raise AssertionError("an untrusted certificate was accepted")
    try:
        keys.verify(sig_with(leaf), payload + b" ")
    except SignatureError as e:
        assert "does not verify" in str(e)
    else:
        raise AssertionError("a signature over other bytes verified")


def test_large_documents_sign_and_verify(tmp_path: Any, doc_keys: dict[str, Any]) -> None:
    """A document far above token sizes (here ~600 KB of narrative) signs and verifies."""
    from dhp.documents.sign import Keys

    b = fx.form_096()
    b["entry"][0]["resource"]["section"][2]["text"]["div"] = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p>' + "Tug'ruq bayoni. " * 40000 + "</p></div>")
    payload = document_payload(b)
    assert len(payload) > 600_000
    keys = Keys(trusted_jwks=str(doc_keys["trusted"]), signing_key=str(doc_keys["platform"]))
    assert keys.verify(detached_signature(b, doc_keys["signer"]), payload)["kid"] == "signer-1"
    token = keys.sign(payload)
    own = {"sigFormat": "application/jose", "data": base64.b64encode(token.encode()).decode()}
    assert keys.verify(own, payload)["kid"] == keys.signing_kid
