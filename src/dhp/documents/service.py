"""The document service: submit (validate, keep, index, split, sign) and protect stored documents.

Storage choice: the ``resources`` row of a document Bundle holds the Bundle as submitted with the server's
``id`` and ``meta`` (versionId, lastUpdated) spliced in, so reads, search and history treat it like any
resource. The exact bytes the client sent — the legal record, never changed — are kept beside it in the
``documents`` table (``dhp.store.documents``) with their SHA-256, and served by ``/documents/{id}/original``;
``DocumentReference.content.attachment.hash`` is the SHA-1 of those bytes.
"""

from __future__ import annotations

import copy
from typing import Any

from dhp import fhirjson
from dhp.documents import checks, sign
from dhp.documents import split as splitter
from dhp.errors import FHIRError, Issue
from dhp.interactions import crud
from dhp.interactions.context import RequestContext, Server
from dhp.store import ConflictError, StoredResource, WriteTx, new_id, now_us, retry_conflicts
from dhp.store import documents as docstore


def _system_ctx(ctx: RequestContext) -> RequestContext:
    # Derived writes (split resources, DocumentReference, Provenance) are the platform's, not the client's:
    # the client was authorized to submit the document.
    return RequestContext(base_url=ctx.base_url, principal=None, accept_language=ctx.accept_language)


def _stamp(bundle: dict[str, Any], rid: str, ts: int) -> dict[str, Any]:
    meta = dict(bundle["meta"]) if isinstance(bundle.get("meta"), dict) else {}
    meta["versionId"] = "1"
    meta["lastUpdated"] = crud.instant(ts)
    out: dict[str, Any] = {"resourceType": "Bundle", "id": rid, "meta": meta}
    for k, v in bundle.items():
        if k not in out:
            out[k] = v
    return out


def _composition_key(comp: dict[str, Any]) -> str | None:
    idents = comp.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    for i in idents or ():
        if isinstance(i, dict) and i.get("system") and i.get("value"):
            return f"{i['system']}|{i['value']}"
    return None


def _patient_of(comp: dict[str, Any], mapping: dict[str, str]) -> str | None:
    for s in checks.arr(comp.get("subject")):
        if isinstance(s, dict) and isinstance(s.get("reference"), str):
            ref = mapping.get(s["reference"], s["reference"])
            if ref.startswith("Patient/") and ref.count("/") == 1:
                return ref[8:]
    return None


class DocumentService:
    """Wired at start-up as ``server.documents``; crud calls it for every ``Bundle`` of type ``document``."""

    def __init__(self, server: Server) -> None:
        self.server = server
        s = server.settings
        try:
            self.keys = sign.Keys(s.document_trusted_keys, s.document_signing_key, s.document_signing_kid,
                                  s.document_trust_anchors)
        except (OSError, ValueError, KeyError, sign.SignatureError) as e:
            # A misconfigured key must stop start-up with a message naming the settings, not a traceback.
            raise RuntimeError("cannot load the document signature keys (DHP_DOCUMENT_TRUSTED_KEYS, "
                               f"DHP_DOCUMENT_SIGNING_KEY, DHP_DOCUMENT_TRUST_ANCHORS): {e}") from e

    # ------------------------------------------------------------------ immutability

    def check_change(self, rtype: str, cur: StoredResource, action: str) -> None:
        if rtype != "Bundle" or cur.deleted or b'"document"' not in cur.content:
            return
        if fhirjson.fast_loads(cur.content).get("type") != "document":
            return
        raise FHIRError(405, f"Bundle/{cur.id} is a clinical document and is kept unaltered: it cannot be "
                        f"{'deleted' if action == 'delete' else 'changed'}. Submit a new version (a new "
                        "Bundle.identifier whose Composition.relatesTo 'replaces' this one), or one with "
                        "Composition.status 'entered-in-error' to withdraw it.", "not-supported",
                        message_id="document-immutable", headers={"Allow": "GET, HEAD"})

    # ------------------------------------------------------------------ submit

    def profile_issues(self, bundle: dict[str, Any], kind: str | None, source: bytes | None) -> list[Issue]:
        server = self.server
        mode = server.settings.validation
        if mode == "off" or server.validator is None:
            return []
        target = checks.with_required_profiles(bundle, kind)
        issues: list[Issue] = server.validator.validate(target, source=source if target is bundle else None)
        if mode == "lenient":
            for i in issues:
                if i.severity in ("error", "fatal"):
                    i.severity = "warning"
        return issues

    def signature_issues(self, bundle: dict[str, Any], canonical: bytes) -> list[Issue]:
        sig = bundle.get("signature")
        if sig is None:
            return []
        if not isinstance(sig, dict):
            return [checks.err("structure", "doc-signature-invalid", "Bundle.signature must be an object",
                               "Bundle.signature")]
        try:
            self.keys.verify(sig, canonical)
        except sign.SignatureError as e:
            return [checks.err("security", "doc-signature-invalid", f"Bundle.signature is not valid: {e}",
                               "Bundle.signature")]
        return []

    async def create(self, server: Server, ctx: RequestContext, resource: dict[str, Any], source: bytes | None,
                     *, tx: WriteTx | None = None, rid: str | None = None) -> crud.WriteResult:
        bundle = resource
        entries = bundle.get("entry") if isinstance(bundle.get("entry"), list) else []
        first = entries[0].get("resource") if entries and isinstance(entries[0], dict) else None
        comp: dict[str, Any] = first if isinstance(first, dict) and first.get("resourceType") == "Composition" else {}
        kind = checks.document_kind(comp) if comp else None

        async def exists(rtype: str, rid_: str) -> bool:
            if tx is not None:
                cur = await tx.current(rtype, rid_)
                return cur is not None and not cur.deleted
            return await server.store.exists(rtype, rid_)

        problems = await checks.rule_issues(bundle, exists, server.registry.resource_types())
        canonical = sign.canonical(bundle)
        issues = problems + self.profile_issues(bundle, kind, source) + self.signature_issues(bundle, canonical)
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        if errors:
            others = [i for i in issues if i.severity not in ("error", "fatal")]
            raise FHIRError(422, f"The document was not accepted: {len(errors)} problem(s). First: "
                            f"{errors[0].diagnostics}", "processing", issues=errors + others)
        warnings = [i for i in issues if i.severity == "warning"]
        ident = bundle["identifier"]
        comp_key = _composition_key(comp) or ""
        status = str(comp.get("status"))
        original = source if source is not None else fhirjson.dumps(bundle)
        canon_hash = sign.sha256_hex(canonical)

        async def work(t: WriteTx) -> crud.WriteResult:
            existing = await docstore.by_identifier(t, ident["system"], ident["value"])
            if existing is not None:
                cur = await t.current("Bundle", existing.bundle_id)
                if existing.canonical_sha256 == canon_hash and cur is not None and not cur.deleted:
                    note = Issue("information", "informational",
                                 f"This document is already stored as Bundle/{existing.bundle_id}; nothing changed",
                                 message_id="document-resubmitted")
                    return crud.WriteResult(cur, 200, fhirjson.loads(cur.content), [note])
                raise FHIRError(409, f"Another document with Bundle.identifier {ident['system']}|{ident['value']} "
                                f"is already stored (Bundle/{existing.bundle_id}); every document version needs "
                                "its own Bundle.identifier", "duplicate", expression="Bundle.identifier",
                                message_id="document-duplicate-identifier")
            previous = await self._previous(t, comp, comp_key, status)
            bundle_id = rid or new_id()
            ts = now_us()
            stamped = _stamp(bundle, bundle_id, ts)
            rec = StoredResource("Bundle", bundle_id, 1, ts, False, fhirjson.dumps(stamped))
            sys_ctx = _system_ctx(ctx)
            mapping: dict[str, str] = {}
            owned: list[tuple[str, str, str, bool]] = []
            if server.settings.document_split and status != "entered-in-error":
                prev_map: dict[str, tuple[str, str]] = {}
                if previous is not None:
                    prev_map = {fu: (rt, i) for fu, rt, i, mine in await docstore.resources_of(t, previous.bundle_id)
                                if mine}
                mapping, owned = await splitter.split(server, sys_ctx, t, bundle_id, bundle, prev_map,
                                                       ctx.base_url)
            elif previous is not None and status == "entered-in-error":
                await splitter.retire(server, sys_ctx, t, await docstore.resources_of(t, previous.bundle_id))
            patient = _patient_of(comp, mapping)
            await t.put(rec, "POST", exists_before=False, patient=patient)
            if server.search is not None:
                # The stored Bundle keeps its bundle-local references; its index rows use the ids the entries
                # were split into, so chains such as composition.patient reach the new Patient.
                indexed = splitter.rewrite(copy.deepcopy(stamped), mapping) if mapping else stamped
                await server.search.index(t, "Bundle", bundle_id, indexed)
            if previous is not None and not await docstore.supersede(t, previous.bundle_id):
                raise ConflictError(f"Bundle/{previous.bundle_id} was replaced concurrently")  # retried: 409
            await docstore.add(t, docstore.DocumentRow(
                bundle_id, ident["system"], ident["value"], comp_key or None, None, status, True,
                previous.bundle_id if previous else None, None, patient, canon_hash, sign.sha256_hex(original), ts),
                original)
            await docstore.add_resources(t, bundle_id, owned)
            docref = splitter.document_reference(bundle_id, bundle, mapping, original, kind,
                                                 previous.docref_id if previous else None, ctx.base_url)
            dres = await crud.create(server, sys_ctx, "DocumentReference", docref, tx=t)
            comp_id = mapping.get(entries[0].get("fullUrl") or "", "").partition("/")[2] or None
            await docstore.set_docref(t, bundle_id, dres.rec.id if dres.rec else "", comp_id)
            if previous is not None:
                if previous.docref_id:
                    await self._supersede_docref(sys_ctx, t, previous.docref_id)
            if isinstance(bundle.get("signature"), dict):
                sig = dict(bundle["signature"])
                if isinstance(sig.get("who"), dict):  # the signer as the resource it was split into
                    sig["who"] = splitter.rewrite(dict(sig["who"]), mapping)
                await self._record_signature(sys_ctx, t, bundle_id, sig, "Bundle.signature")
            if server.settings.document_countersign and self.keys.can_sign:
                await self._countersign(sys_ctx, t, bundle_id, canonical)
            return crud.WriteResult(rec, 201, stamped, warnings)

        if tx is not None:
            return await work(tx)

        async def once() -> crud.WriteResult:
            async with server.store.begin() as own:
                return await work(own)

        return await retry_conflicts(once)  # type: ignore[no-any-return]

    async def _previous(self, t: WriteTx, comp: dict[str, Any], key: str, status: str) -> docstore.DocumentRow | None:
        """The version this document replaces (life-cycle rules), or None for a first version."""
        replaces = [r for r in checks.arr(comp.get("relatesTo"))
                    if isinstance(r, dict) and r.get("type") == "replaces"]
        where = "Bundle.entry[0].resource.ofType(Composition).relatesTo"
        current = await docstore.current_for_composition(t, key) if key else None
        if not replaces:
            if current is not None:
                raise FHIRError(409, f"A document with Composition.identifier {key} is already stored "
                                f"(Bundle/{current.bundle_id}, status {current.status}); a new version must say "
                                "so with Composition.relatesTo {type: replaces} pointing at it",
                                "conflict", expression=where, message_id="document-version-exists")
            if status in ("amended", "entered-in-error"):
                raise FHIRError(422, f"A document with status '{status}' must replace an earlier version "
                                "(Composition.relatesTo with type 'replaces')", "business-rule",
                                expression=where, message_id="document-replaces-missing")
            return None
        if len(replaces) > 1:
            raise FHIRError(422, "A document version replaces exactly one earlier version", "business-rule",
                            expression=where, message_id="document-replaces-many")
        target = replaces[0].get("resourceReference")
        target = target if isinstance(target, dict) else {}
        prev: docstore.DocumentRow | None = None
        ref = target.get("reference")
        if isinstance(ref, str) and ref.startswith("Bundle/"):
            prev = await docstore.get(t, ref[7:].split("/")[0])
        elif isinstance(ref, str) and ref.startswith("Composition/"):
            if current is not None and current.composition_id == ref[12:].split("/")[0]:
                prev = current
        elif isinstance(target.get("identifier"), dict):
            ti = target["identifier"]
            # Strings only: other JSON types reach here in lenient mode and are no registry key.
            if isinstance(ti.get("system"), str) and isinstance(ti.get("value"), str) and ti["system"] and ti["value"]:
                prev = await docstore.by_identifier(t, ti["system"], ti["value"])
                if prev is None and f"{ti['system']}|{ti['value']}" == key:
                    prev = current
        if prev is None:
            raise FHIRError(422, "Composition.relatesTo 'replaces' must point at a stored document: "
                            "resourceReference.reference 'Bundle/[id]' or 'Composition/[id]', or "
                            "resourceReference.identifier with the earlier Bundle.identifier", "not-found",
                            expression=where, message_id="document-replaces-unknown")
        if prev.composition_key != key:
            raise FHIRError(422, f"A new version keeps the document's identity: Composition.identifier must be "
                            f"{prev.composition_key}, as in Bundle/{prev.bundle_id}", "business-rule",
                            expression="Bundle.entry[0].resource.ofType(Composition).identifier",
                            message_id="document-identity-changed")
        if not prev.current:
            raise FHIRError(409, f"Bundle/{prev.bundle_id} was already replaced by a later version; replace the "
                            "current version instead", "conflict", expression=where,
                            message_id="document-superseded")
        allowed = checks.TRANSITIONS.get(prev.status, ())
        if status not in allowed:
            raise FHIRError(409, f"A '{prev.status}' document cannot be followed by a '{status}' version (allowed: "
                            f"{', '.join(allowed) or 'none — it was withdrawn'})", "business-rule",
                            expression="Bundle.entry[0].resource.ofType(Composition).status",
                            message_id="document-transition")
        return prev

    async def _supersede_docref(self, ctx: RequestContext, t: WriteTx, docref_id: str) -> None:
        cur = await t.current("DocumentReference", docref_id)
        if cur is None or cur.deleted:
            return
        dr = fhirjson.loads(cur.content)
        if dr.get("status") == "current":
            dr["status"] = "superseded"
            await crud.update(self.server, ctx, "DocumentReference", docref_id, dr, tx=t)

    # ------------------------------------------------------------------ signatures

    async def _record_signature(self, ctx: RequestContext, t: WriteTx, bundle_id: str, sig: dict[str, Any],
                                origin: str) -> str:
        who = sig.get("who") if isinstance(sig.get("who"), dict) else None
        if who is not None and isinstance(who.get("reference"), str) and who["reference"].startswith("urn:"):
            who = {k: v for k, v in who.items() if k != "reference"} or None
        prov = {"resourceType": "Provenance", "target": [{"reference": f"Bundle/{bundle_id}"}],
                "recorded": crud.instant(now_us()),
                "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                         "code": "AUTHEN", "display": "authenticator"}],
                             "text": f"Signature ({origin})"},
                "agent": [{"who": who or {"display": "signer"}}],
                "signature": [sig]}
        res = await crud.create(self.server, ctx, "Provenance", prov, tx=t)
        return res.rec.id if res.rec else ""

    async def _countersign(self, ctx: RequestContext, t: WriteTx, bundle_id: str, canonical: bytes) -> str:
        token = self.keys.sign(canonical)
        sig = sign.signature_element(token, {"display": "DHP platform"}, sign.VERIFY_SIG)
        return await self._record_signature(ctx, t, bundle_id, sig, "platform countersignature")

    async def add_signature(self, ctx: RequestContext, bundle_id: str, sig: dict[str, Any] | None) -> dict[str, Any]:
        """Verify ``sig`` over a stored document (or, with None, countersign it) and record it as Provenance."""
        rec = await self.server.store.read("Bundle", bundle_id)
        if rec is None or rec.deleted:
            raise FHIRError(404, f"Bundle/{bundle_id} is not known", "not-found", message_id="resource-not-found")
        bundle = fhirjson.loads(rec.content)
        if bundle.get("type") != "document":
            raise FHIRError(422, f"Bundle/{bundle_id} is not a document", "business-rule",
                            message_id="not-a-document")
        canonical = sign.canonical(bundle)
        if sig is not None:
            try:
                self.keys.verify(sig, canonical)
            except sign.SignatureError as e:
                raise FHIRError(422, f"The signature is not valid: {e}", "security", expression="signature",
                                message_id="doc-signature-invalid") from None
        elif not self.keys.can_sign:
            raise FHIRError(422, "No platform signing key is configured (DHP_DOCUMENT_SIGNING_KEY)",
                            "not-supported", message_id="no-signing-key")
        sys_ctx = _system_ctx(ctx)

        async def once() -> str:
            async with self.server.store.begin() as t:
                if sig is None:
                    return await self._countersign(sys_ctx, t, bundle_id, canonical)
                return await self._record_signature(sys_ctx, t, bundle_id, sig, "submitted")

        pid = await retry_conflicts(once)
        cur = await self.server.store.read("Provenance", pid)
        assert cur is not None
        return fhirjson.loads(cur.content)  # type: ignore[no-any-return]

    async def check_provenance(self, resource: dict[str, Any], tx: WriteTx | None = None) -> None:
        """A Provenance that carries signatures over a stored document must verify (422 otherwise).

        Meant to be called by crud before writing any Provenance (``POST /fhir/Provenance`` or a transaction
        entry), so signatures arriving outside ``$sign`` are checked too.
        """
        sigs = [s for s in checks.arr(resource.get("signature")) if isinstance(s, dict)]
        if not sigs:
            return
        for ti, target in enumerate(checks.arr(resource.get("target"))):
            ref = target.get("reference") if isinstance(target, dict) else None
            if not isinstance(ref, str) or not ref.startswith("Bundle/"):
                continue
            bid = ref[7:].split("/")[0]
            cur = await tx.current("Bundle", bid) if tx is not None else await self.server.store.read("Bundle", bid)
            if cur is None or cur.deleted or b'"document"' not in cur.content:
                continue
            bundle = fhirjson.loads(cur.content)
            if bundle.get("type") != "document":
                continue
            canonical = sign.canonical(bundle)
            for si, sig in enumerate(sigs):
                try:
                    self.keys.verify(sig, canonical)
                except sign.SignatureError as e:
                    raise FHIRError(422, f"Provenance.signature[{si}] over {ref} (target[{ti}]) is not valid: {e}",
                                    "security", expression=f"Provenance.signature[{si}]",
                                    message_id="doc-signature-invalid") from None

    async def verify(self, bundle_id: str) -> dict[str, Any]:
        """Check every signature on a stored document: Bundle.signature and the Provenances that target it."""
        rec = await self.server.store.read("Bundle", bundle_id)
        if rec is None or rec.deleted:
            raise FHIRError(404, f"Bundle/{bundle_id} is not known", "not-found", message_id="resource-not-found")
        bundle = fhirjson.loads(rec.content)
        canonical = sign.canonical(bundle)
        found: list[tuple[str, dict[str, Any]]] = []
        if isinstance(bundle.get("signature"), dict):
            found.append(("Bundle.signature", bundle["signature"]))
        if self.server.search is not None:
            from dhp.interactions.search import find_ids

            for pid in sorted(await find_ids(self.server, "Provenance", [("target", f"Bundle/{bundle_id}")])):
                cur = await self.server.store.read("Provenance", pid)
                if cur is None or cur.deleted:
                    continue
                for i, s in enumerate(checks.arr(fhirjson.loads(cur.content).get("signature"))):
                    if isinstance(s, dict):
                        found.append((f"Provenance/{pid}.signature[{i}]", s))
        params: list[dict[str, Any]] = []
        for where, s in found:
            part = [{"name": "source", "valueString": where}]
            try:
                header = self.keys.verify(s, canonical)
                part.append({"name": "valid", "valueBoolean": True})
                if header.get("kid"):
                    part.append({"name": "kid", "valueString": str(header["kid"])})
            except sign.SignatureError as e:
                part += [{"name": "valid", "valueBoolean": False}, {"name": "reason", "valueString": str(e)}]
            params.append({"name": "signature", "part": part})
        ok = bool(found) and all(p["part"][1]["valueBoolean"] for p in params)
        return {"resourceType": "Parameters", "parameter": [
            {"name": "verified", "valueBoolean": ok}, {"name": "count", "valueInteger": len(found)}, *params]}

    # ------------------------------------------------------------------ show

    async def render_html(self, ctx: RequestContext, rec: StoredResource) -> bytes:
        from dhp.documents.render import render_document

        return await render_document(self.server, rec, ctx.accept_language)
