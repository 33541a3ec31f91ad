"""Clinical-document operations.

- ``Composition/[id]/$document``: assemble a document Bundle from stored resources (the Composition, what
  it references, and what those reference), with generated narrative for sections that have none;
  ``persist=true`` stores it as a document (validated, indexed and kept like a submitted one).
- ``Bundle/[id]/$sign``: record a signature (``signature``, a FHIR Signature with a detached JWS) over a
  stored document as a Provenance, after verifying it.
- ``Bundle/[id]/$countersign``: the platform signs the document with its configured key.
- ``Bundle/[id]/$verify-signature``: check every signature on a stored document.
"""

from __future__ import annotations

import uuid
from typing import Any

from dhp import fhirjson
from dhp.errors import FHIRError, bad_request
from dhp.interactions import crud
from dhp.interactions.operations import OperationCall, OperationResult, operation

_SKIP = frozenset({"Bundle", "DocumentReference", "Provenance", "AuditEvent"})
_MAX = 500


def _refs(node: Any, out: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out.append(v)
            elif k not in ("relatesTo", "contained", "text") and isinstance(v, dict | list):
                _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def _service(call: OperationCall) -> Any:
    if call.server.documents is None:
        raise FHIRError(501, "Clinical documents are not enabled on this server", "not-supported")
    return call.server.documents


async def assemble(call: OperationCall, comp_id: str) -> dict[str, Any]:
    server = call.server
    rec = await crud.read(server, call.ctx, "Composition", comp_id)
    comp = fhirjson.loads(rec.content)
    found: dict[str, dict[str, Any]] = {f"Composition/{comp_id}": comp}
    frontier = [comp]
    for _depth in range(3):  # the Composition, its references, and theirs (PractitionerRole → Practitioner …)
        nxt = []
        for res in frontier:
            refs: list[str] = []
            _refs({k: v for k, v in res.items() if k not in ("id", "meta")}, refs)
            for ref in refs:
                ref = ref.split("#", 1)[0]
                if ref.startswith(call.ctx.base_url + "/"):
                    ref = ref[len(call.ctx.base_url) + 1:]
                parts = ref.split("/")
                if len(parts) != 2 or ref in found or parts[0] in _SKIP:
                    continue
                target = await server.store.read(parts[0], parts[1])
                if target is None or target.deleted:
                    if res is comp:
                        raise FHIRError(422, f"Composition/{comp_id} refers to {ref}, which is not on this server; "
                                        "a document needs every resource the Composition references",
                                        "not-found", message_id="document-reference-unresolved")
                    continue
                if len(found) >= _MAX:
                    raise FHIRError(422, f"The document would hold more than {_MAX} resources", "too-costly")
                found[ref] = fhirjson.loads(target.content)
                nxt.append(found[ref])
        frontier = nxt
    from dhp.documents.render import fill_narratives, pick_language

    entries = [{"fullUrl": f"{call.ctx.base_url}/{k}", "resource": v} for k, v in found.items()]
    bundle = {"resourceType": "Bundle",
              "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
              "type": "document", "timestamp": crud.instant(crud.now_us()), "entry": entries}
    return fill_narratives(bundle, server, pick_language(call.ctx.accept_language))


@operation("document", types=("Composition",), type_level=False, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/Composition-document")
async def document(call: OperationCall) -> dict[str, Any] | OperationResult:
    assert call.id is not None
    if call.params.has("graph"):
        raise FHIRError(400, "The graph parameter is not supported; the document follows the Composition's "
                        "references", "not-supported", expression="graph", message_id="document-graph")
    persist = call.params.bool("persist") or False
    if persist and call.method != "POST":
        raise FHIRError(405, "persist=true changes state: use POST", "not-supported",
                        message_id="method-not-allowed", headers={"Allow": "POST"})
    bundle = await assemble(call, call.id)
    if not persist:
        return bundle
    crud.authorize(call.server, call.ctx, "c", "Bundle")
    res = await _service(call).create(call.server, call.ctx, bundle, None)
    rec = res.rec
    assert rec is not None
    headers = {"Location": f"{call.ctx.base_url}/Bundle/{rec.id}/_history/{rec.version}",
               "ETag": crud.etag(rec.version)}
    return OperationResult(None, res.status, headers, raw=rec.content)


@operation("sign", types=("Bundle",), type_level=False, instance=True, affects_state=True)
async def sign_document(call: OperationCall) -> OperationResult:
    assert call.id is not None
    crud.authorize(call.server, call.ctx, "c", "Provenance")
    sig = call.params.value("signature")
    if not isinstance(sig, dict):
        raise bad_request("POST a Parameters with 'signature' (valueSignature: sigFormat application/jose, data = "
                          "base64 of a detached JWS over the document's canonical JSON)", "signature")
    prov = await _service(call).add_signature(call.ctx, call.id, sig)
    return OperationResult(prov, 201, {"Location": f"{call.ctx.base_url}/Provenance/{prov['id']}"})


@operation("countersign", types=("Bundle",), type_level=False, instance=True, affects_state=True)
async def countersign(call: OperationCall) -> OperationResult:
    assert call.id is not None
    crud.authorize(call.server, call.ctx, "c", "Provenance")
    prov = await _service(call).add_signature(call.ctx, call.id, None)
    return OperationResult(prov, 201, {"Location": f"{call.ctx.base_url}/Provenance/{prov['id']}"})


@operation("verify-signature", types=("Bundle",), type_level=False, instance=True)
async def verify_signature(call: OperationCall) -> dict[str, Any]:
    assert call.id is not None
    crud.authorize(call.server, call.ctx, "r", "Bundle")
    return await _service(call).verify(call.id)  # type: ignore[no-any-return]
