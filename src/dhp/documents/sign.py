"""Signatures on clinical documents: JWS (detached payload) over the document's canonical JSON.

FHIR's signature rules: the signed bytes are the canonical JSON of the Bundle with the ``#document``
variant — ``Bundle.id``, ``Bundle.meta`` and ``Bundle.signature`` removed, narrative kept — written with
properties in sorted order and no insignificant whitespace (decimals keep their own digits).
``Signature.data`` holds the base64 of a JWS compact serialization whose payload part is empty (RFC 7515
Appendix F); the verifier re-attaches the canonical bytes.

Keys are configuration: ``DHP_DOCUMENT_TRUSTED_KEYS`` (a JWKS file with the public keys of the national
e-signature services and signers, looked up by ``kid``) and ``DHP_DOCUMENT_SIGNING_KEY`` (the platform's
private JWK or PEM, for countersigning). An ``x5c`` certificate in the JWS header is accepted when it is
issued by one of the certificates in ``DHP_DOCUMENT_TRUST_ANCHORS`` (a PEM file) and valid at signing time.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

SIG_FORMAT = "application/jose"
CANON_DOCUMENT = "http://hl7.org/fhir/canonicalization/json#document"
#: Signature.type codes (ASTM E1762-95): author's signature, verification (countersign by the platform).
AUTHOR_SIG = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1", "display": "Author's Signature"}
VERIFY_SIG = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
              "display": "Verification Signature"}
#: National e-signature services add JAdES header fields (sigT, …): accept headers joserfc does not know.
_REGISTRY = jws.JWSRegistry(strict_check_header=False)
# joserfc's defaults (512-byte header, 128 KB payload) are for tokens: an x5c certificate chain and a whole
# clinical document are much larger.
_REGISTRY.max_header_length = 64 * 1024
_REGISTRY.max_payload_length = 256 * 1024 * 1024
_REGISTRY.max_signature_length = 16 * 1024
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


def _frag(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj).encode())
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def canonical(bundle: dict[str, Any]) -> bytes:
    """The canonical JSON of a document Bundle (the ``#document`` canonicalization)."""
    body = {k: v for k, v in bundle.items() if k not in ("id", "meta", "signature")}
    return orjson.dumps(body, default=_frag, option=orjson.OPT_SORT_KEYS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SignatureError(Exception):
    pass


class Keys:
    """Trusted verification keys and the platform signing key, loaded from the configured files."""

    def __init__(self, trusted_jwks: str = "", signing_key: str = "", signing_kid: str = "",
                 trust_anchors: str = "") -> None:
        self.trusted = KeySet([])
        if trusted_jwks:
            data = orjson.loads(Path(trusted_jwks).read_bytes())
            self.trusted = KeySet.import_key_set(data if "keys" in data else {"keys": [data]})
        self.signing: RSAKey | ECKey | OKPKey | None = None
        self.signing_kid = signing_kid
        if signing_key:
            raw = Path(signing_key).read_bytes()
            key: Any
            if raw.lstrip().startswith(b"{"):
                jwk = orjson.loads(raw)
                key = {"RSA": RSAKey, "EC": ECKey, "OKP": OKPKey}[jwk["kty"]].import_key(jwk)
            else:
                key = _import_pem(raw)
            self.signing = key
            self.signing_kid = signing_kid or key.kid or key.thumbprint()
        self.anchors: list[Any] = []
        if trust_anchors:
            from cryptography import x509

            self.anchors = x509.load_pem_x509_certificates(Path(trust_anchors).read_bytes())

    @property
    def can_sign(self) -> bool:
        return self.signing is not None

    def sign(self, payload: bytes) -> str:
        """A detached compact JWS over ``payload`` with the platform key."""
        if self.signing is None:
            raise SignatureError("no platform signing key is configured (DHP_DOCUMENT_SIGNING_KEY)")
        alg = _alg_for(self.signing)
        token = jws.serialize_compact({"alg": alg, "kid": self.signing_kid, "typ": "JOSE"}, payload,
                                      self.signing, algorithms=[alg], registry=_REGISTRY)
        h, _p, s = token.split(".")
        return f"{h}..{s}"

    def public_jwks(self) -> dict[str, Any]:
        if self.signing is None:
            return {"keys": []}
        pub = self.signing.as_dict(private=False)
        pub["kid"] = self.signing_kid
        return {"keys": [pub]}

    def verify(self, sig: dict[str, Any], payload: bytes) -> dict[str, Any]:
        """Check one FHIR Signature over ``payload``; returns the JWS header, raises SignatureError."""
        if sig.get("sigFormat") not in (None, SIG_FORMAT):
            raise SignatureError(f"sigFormat {sig.get('sigFormat')!r} is not supported; use {SIG_FORMAT}")
        data = sig.get("data")
        if not isinstance(data, str) or not data:
            raise SignatureError("Signature.data (the base64 of a detached JWS) is missing")
        try:
            token = base64.b64decode(data, validate=True).decode("ascii").strip()
        except (ValueError, UnicodeDecodeError):
            raise SignatureError("Signature.data is not base64 of a JWS compact serialization") from None
        parts = token.split(".")
        if len(parts) != 3:
            raise SignatureError("Signature.data is not a JWS compact serialization (header.payload.signature)")
        if parts[1]:
            # An attached payload must be exactly the canonical document.
            try:
                attached = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
            except ValueError:
                raise SignatureError("the JWS payload is not base64url") from None
            if attached != payload:
                raise SignatureError("the JWS payload is not the canonical form of this document")
        try:
            header = orjson.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        except (ValueError, orjson.JSONDecodeError):
            raise SignatureError("the JWS header is not base64url JSON") from None
        if not isinstance(header, dict):
            raise SignatureError("the JWS header is not a JSON object")
        key = self._key_for(header)
        try:
            jws.deserialize_compact(f"{parts[0]}..{parts[2]}" if not parts[1] else token, key,
                                    algorithms=ALGORITHMS, payload=payload if not parts[1] else None,
                                    registry=_REGISTRY)
        except JoseError as e:
            raise SignatureError(f"the signature does not verify: {e.error}") from None
        except ValueError as e:
            raise SignatureError(f"the signature does not verify: {e}") from None
        return header

    def _key_for(self, header: dict[str, Any]) -> Any:
        kid = header.get("kid")
        if isinstance(kid, str):
            for k in self.trusted.keys:
                if k.kid == kid:
                    return k
        if self.signing is not None and kid == self.signing_kid:
            return self.signing
        x5c = header.get("x5c")
        if isinstance(x5c, list) and x5c and self.anchors:
            return self._cert_key(x5c, header)
        raise SignatureError(f"the signing key {kid!r} is not trusted (not in DHP_DOCUMENT_TRUSTED_KEYS, "
                             "and no x5c certificate issued by a configured trust anchor)")

    def _cert_key(self, x5c: list[Any], header: dict[str, Any]) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0]))
        except ValueError:
            raise SignatureError("x5c[0] is not a DER certificate") from None
        when = datetime.now(UTC)
        if not (cert.not_valid_before_utc <= when <= cert.not_valid_after_utc):
            raise SignatureError("the signer's certificate is not valid now")
        for anchor in self.anchors:
            if anchor.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, Exception) as e:  # InvalidSignature has no common base
                raise SignatureError(f"the signer's certificate is not issued by a trust anchor: {e}") from None
            pem = cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
            return _import_pem(pem)
        raise SignatureError("the signer's certificate is not issued by a configured trust anchor")


def _import_pem(raw: bytes) -> Any:
    for cls in (RSAKey, ECKey, OKPKey):
        try:
            return cls.import_key(raw)
        except (ValueError, TypeError, JoseError):
            continue
    raise SignatureError("the configured key is not an RSA, EC or OKP key in PEM or JWK form")


def _alg_for(key: Any) -> str:
    if isinstance(key, RSAKey):
        return "RS256"
    if isinstance(key, ECKey):
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(key.curve_name, "ES256")
    return "EdDSA"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def signature_element(token: str, who: dict[str, Any] | None, kind: dict[str, str] = VERIFY_SIG) -> dict[str, Any]:
    """A FHIR Signature holding a detached JWS."""
    sig: dict[str, Any] = {"type": [kind], "when": _now_iso().replace("Z", "+00:00"),
                           "sigFormat": SIG_FORMAT, "targetFormat": "application/fhir+json",
                           "data": base64.b64encode(token.encode("ascii")).decode("ascii")}
    if who:
        sig["who"] = who
    return sig
