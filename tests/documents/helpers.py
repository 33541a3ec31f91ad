"""Small helpers shared by the document tests: posting, searching, independent canonical JSON and JWS."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import httpx
from joserfc import jws

from dhp import fhirjson


def post(client: httpx.Client, bundle: dict[str, Any], raw: bytes | None = None) -> httpx.Response:
    return client.post("/Bundle", content=raw if raw is not None else fhirjson.dumps(bundle))


def search(client: httpx.Client, path: str, **params: str) -> list[dict[str, Any]]:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry") or () if (e.get("search") or {}).get("mode", "match")
            == "match"]


def canonical(node: Any) -> str:
    """FHIR canonical JSON written independently of the server: sorted keys, no whitespace, own decimals."""
    if isinstance(node, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical(node[k]) for k in sorted(node)) + "}"
    if isinstance(node, list):
        return "[" + ",".join(canonical(v) for v in node) + "]"
    if isinstance(node, Decimal):
        return str(node)
    return json.dumps(node, ensure_ascii=False)


def document_payload(bundle: dict[str, Any]) -> bytes:
    body = {k: v for k, v in bundle.items() if k not in ("id", "meta", "signature")}
    return canonical(body).encode("utf-8")


def detached_signature(bundle: dict[str, Any], key: Any, who: str | None = None,
                       **header: Any) -> dict[str, Any]:
    payload = document_payload(bundle)
    registry = jws.JWSRegistry(strict_check_header=False)
    registry.max_payload_length = 64 * 1024 * 1024  # whole documents, not tokens
    token = jws.serialize_compact({"alg": "ES256", "kid": key.kid, **header}, payload, key, registry=registry)
    h, _, s = token.split(".")
    sig: dict[str, Any] = {
        "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1",
                  "display": "Author's Signature"}],
        "when": "2026-03-02T12:06:00+05:00", "sigFormat": "application/jose",
        "data": base64.b64encode(f"{h}..{s}".encode()).decode()}
    if who:
        sig["who"] = {"reference": who}
    return sig
