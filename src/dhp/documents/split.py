"""Split a document into atomic resources, index it with a DocumentReference, record Provenance.

New entries become new resources; entries that carry an identifier already on the server (the mother's
PINFL, a practitioner's or an organization's id) are matched, not duplicated; entries of the version a
document replaces (same fullUrl) are updated in place. One Provenance per document links every resource
it wrote back to the Bundle (``entity.what``), so ``Provenance?target=…`` finds a value's source.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

from dhp import fhirjson
from dhp.documents.checks import FORM_CS, arr, codes
from dhp.interactions import crud
from dhp.interactions.context import RequestContext, Server
from dhp.store import WriteTx, new_id

#: Where a resource type keeps a status that can say "entered-in-error" (retiring a withdrawn document).
RETIRE = {"Observation": "status", "Procedure": "status", "Encounter": "status", "MedicationStatement": "status",
          "MedicationRequest": "status", "MedicationAdministration": "status", "DiagnosticReport": "status",
          "Composition": "status", "ServiceRequest": "status", "Immunization": "status"}


def rewrite(node: Any, mapping: dict[str, str]) -> Any:
    """Replace bundle-local references (fullUrls) with the server ``Type/id`` they became."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                base, _, frag = v.partition("#")
                if base in mapping:
                    node[k] = mapping[base] + (f"#{frag}" if frag else "")
            elif isinstance(v, dict | list):
                rewrite(v, mapping)
    elif isinstance(node, list):
        for v in node:
            rewrite(v, mapping)
    return node


async def match_identifier(server: Server, t: WriteTx, rtype: str, resource: dict[str, Any]) -> str | None:
    """The id of a live resource of the same type sharing a (system, value) identifier, if any."""
    if server.search is None:
        return None
    idents = resource.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    if not isinstance(idents, list):
        return None
    from dhp.interactions.search import find_ids

    for ident in idents:
        if not isinstance(ident, dict):
            continue
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(system, str) or not isinstance(value, str) or not system or not value:
            continue
        esc = value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")
        ids = await find_ids(server, rtype, [("identifier", f"{system}|{esc}")], tx=t)
        if ids:
            return sorted(ids)[0]
    return None


def _server_url_id(full_url: str, r: dict[str, Any], base_url: str) -> str | None:
    rt, rid = r.get("resourceType"), r.get("id")
    if base_url and isinstance(rid, str) and full_url == f"{base_url}/{rt}/{rid}":
        return rid
    return None


def local_aliases(entry: dict[str, Any]) -> list[str]:
    """References that mean this entry: its fullUrl, and Type/id when the fullUrl is that resource's URL."""
    fu = entry.get("fullUrl")
    r = entry.get("resource") or {}
    out = [fu] if isinstance(fu, str) else []
    rt, rid = r.get("resourceType"), r.get("id")
    if isinstance(fu, str) and rid and fu.endswith(f"/{rt}/{rid}") and not fu.startswith("urn:"):
        out.append(f"{rt}/{rid}")
    return out


async def split(server: Server, ctx: RequestContext, t: WriteTx, bundle_id: str, bundle: dict[str, Any],
                previous: dict[str, tuple[str, str]], base_url: str = ""
                ) -> tuple[dict[str, str], list[tuple[str, str, str, bool]]]:
    """Write the entries as atomic resources. Returns (reference mapping, (fullUrl, type, id, owned) rows).

    ``previous``: fullUrl → (type, id) of resources the replaced version wrote (updated, not duplicated).
    """
    entries = [e for e in arr(bundle.get("entry")) if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    mapping: dict[str, str] = {}
    plan: list[tuple[dict[str, Any], str, str, str]] = []  # (entry, type, id, action)
    for e in entries:
        r = e["resource"]
        rt = r["resourceType"]
        fu = e.get("fullUrl") or ""
        prev = previous.get(fu)
        own = _server_url_id(fu, r, base_url)
        if prev is not None and prev[0] == rt:
            action, rid = "update", prev[1]
        elif own is not None and await t.current(rt, own) is not None:
            # The entry *is* a resource of this server (fullUrl = its URL, e.g. from $document): link, don't copy.
            action, rid = "match", own
        else:
            found = await match_identifier(server, t, rt, r) if rt != "Composition" else None
            action, rid = ("match", found) if found else ("create", new_id())
        for alias in local_aliases(e):
            mapping[alias] = f"{rt}/{rid}"
        plan.append((e, rt, rid, action))
    await _match_roles(server, t, plan, mapping)
    rows: list[tuple[str, str, str, bool]] = []
    targets: list[dict[str, str]] = []
    for e, rt, rid, action in plan:
        fu = e.get("fullUrl") or f"{rt}/{rid}"
        if action == "match":
            rows.append((fu, rt, rid, False))
            continue
        res = rewrite(copy.deepcopy(e["resource"]), mapping)
        res.pop("id", None)
        meta = res.get("meta")
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated", "source")}
            res["meta"] = meta
            if not meta:
                res.pop("meta")
        if action == "create":
            await crud.create(server, ctx, rt, res, tx=t, rid=rid)
        else:
            res["id"] = rid
            await crud.update(server, ctx, rt, rid, res, tx=t)
        rows.append((fu, rt, rid, True))
        targets.append({"reference": f"{rt}/{rid}"})
    if targets:
        prov = provenance_for_split(bundle_id, bundle, targets, mapping)
        await crud.create(server, ctx, "Provenance", prov, tx=t)
    return mapping, rows


async def _match_roles(server: Server, t: WriteTx, plan: list[tuple[dict[str, Any], str, str, str]],
                       mapping: dict[str, str]) -> None:
    """A PractitionerRole rarely has an identifier: it is the same role when a known practitioner already has
    one at the same known organization (both matched, not new in this document)."""
    if server.search is None:
        return
    new = {f"{rt}/{rid}" for _e, rt, rid, action in plan if action == "create"}
    from dhp.interactions.search import find_ids

    for i, (e, rt, _rid, action) in enumerate(plan):
        if rt != "PractitionerRole" or action != "create":
            continue
        r = e["resource"]
        refs = []
        for el in ("practitioner", "organization"):
            ref = (r.get(el) or {}).get("reference") if isinstance(r.get(el), dict) else None
            ref = mapping.get(ref, ref) if isinstance(ref, str) else None
            if ref is None or ref in new or ref.startswith(("urn:", "http:", "https:")) or ref.count("/") != 1:
                break
            refs.append((el, ref))
        if len(refs) != 2:
            continue
        found = await find_ids(server, "PractitionerRole", refs, tx=t)
        if found:
            rid = sorted(found)[0]
            plan[i] = (e, rt, rid, "match")
            for alias in local_aliases(e):
                mapping[alias] = f"{rt}/{rid}"


def _agent_who(comp: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    for ref in [comp.get("custodian"), *arr(comp.get("author"))]:
        if isinstance(ref, dict):
            out = out_ref(ref, mapping)
            if out:
                return out
    return {"display": "DHP"}


def provenance_for_split(bundle_id: str, bundle: dict[str, Any], targets: list[dict[str, str]],
                         mapping: dict[str, str]) -> dict[str, Any]:
    comp = bundle["entry"][0]["resource"]
    prov: dict[str, Any] = {
        "resourceType": "Provenance", "target": targets, "recorded": crud.instant(crud.now_us()),
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE", "display": "create"}],
                     "text": "Extracted from a clinical document"},
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "custodian", "display": "Custodian"}]},
                   "who": _agent_who(comp, mapping)}],
        "entity": [{"role": "source", "what": {"reference": f"Bundle/{bundle_id}"}}],
    }
    if isinstance(bundle.get("timestamp"), str):
        prov["occurredDateTime"] = bundle["timestamp"]
    return prov


def out_ref(ref: dict[str, Any], mapping: dict[str, str], index: dict[str, dict[str, Any]] | None = None
            ) -> dict[str, Any] | None:
    """A reference usable outside the document: the split resource, a server resource, or an identifier."""
    r = ref.get("reference")
    out: dict[str, Any] = {}
    if isinstance(r, str):
        base = r.split("#", 1)[0]
        if base in mapping:
            out["reference"] = mapping[base]
        elif not base.startswith(("urn:", "http:", "https:")) and base.count("/") == 1:
            out["reference"] = base
        elif index is not None and base in index:
            target = index[base]
            idents = [i for i in arr(target.get("identifier")) if isinstance(i, dict) and i.get("value")] \
                if isinstance(target.get("identifier"), list) else []
            if idents:
                out["identifier"] = {k: v for k, v in idents[0].items() if k in ("system", "value", "type")}
                out["type"] = target.get("resourceType")
    elif isinstance(ref.get("identifier"), dict):
        out["identifier"] = ref["identifier"]
    if isinstance(ref.get("display"), str):
        out["display"] = ref["display"]
    return out or None


def document_reference(bundle_id: str, bundle: dict[str, Any], mapping: dict[str, str], source: bytes,
                       kind: str | None, previous_docref: str | None, base_url: str) -> dict[str, Any]:
    """The DocumentReference that indexes a stored document (subject, type, category, author, …)."""
    comp = bundle["entry"][0]["resource"]
    index = {e["fullUrl"]: e["resource"] for e in arr(bundle.get("entry"))
             if isinstance(e, dict) and isinstance(e.get("fullUrl"), str) and isinstance(e.get("resource"), dict)}
    status = comp.get("status")
    dr: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "identifier": [{"use": "official", **bundle["identifier"]}]
        + [i for i in arr(comp.get("identifier")) if isinstance(i, dict)],
        "status": "entered-in-error" if status == "entered-in-error" else "current",
        "docStatus": status,
    }
    if isinstance(comp.get("type"), dict):
        dr["type"] = comp["type"]
    cats = [c for c in arr(comp.get("category")) if isinstance(c, dict)]
    if kind and not any(kind in codes(c) for c in cats):
        cats.append({"coding": [{"system": FORM_CS, "code": kind}]})
    if cats:
        dr["category"] = cats
    subjects = [out_ref(s, mapping, index) for s in arr(comp.get("subject")) if isinstance(s, dict)]
    subjects = [s for s in subjects if s]
    if subjects:
        dr["subject"] = subjects[0]  # DocumentReference.subject is 0..1; twins: the first newborn
    if isinstance(comp.get("encounter"), dict):
        enc = out_ref(comp["encounter"], mapping, index)
        if enc and "reference" in enc:
            dr["context"] = [enc]
    if isinstance(bundle.get("timestamp"), str):
        dr["date"] = _instant(bundle["timestamp"])
    authors = [out_ref(a, mapping, index) for a in arr(comp.get("author")) if isinstance(a, dict)]
    if any(authors):
        dr["author"] = [a for a in authors if a]
    attesters = []
    for a in arr(comp.get("attester")):
        if not isinstance(a, dict) or not isinstance(a.get("mode"), dict):
            continue
        att: dict[str, Any] = {"mode": a["mode"]}
        if a.get("time"):
            att["time"] = a["time"]
        if isinstance(a.get("party"), dict):
            party = out_ref(a["party"], mapping, index)
            if party:
                att["party"] = party
        attesters.append(att)
    if attesters:
        dr["attester"] = attesters
    if isinstance(comp.get("custodian"), dict):
        cust = out_ref(comp["custodian"], mapping, index)
        if cust:
            dr["custodian"] = cust
    if previous_docref:
        dr["relatesTo"] = [{"code": {"coding": [{"system": "http://hl7.org/fhir/document-relationship-type",
                                                 "code": "replaces", "display": "Replaces"}]},
                            "target": {"reference": f"DocumentReference/{previous_docref}"}}]
    if isinstance(comp.get("title"), str):
        dr["description"] = comp["title"]
    att = {"contentType": "application/fhir+json", "language": comp.get("language") or "uz",
           "url": f"{base_url}/Bundle/{bundle_id}", "size": str(len(source)),
           "hash": base64.b64encode(hashlib.sha1(source).digest()).decode("ascii")}
    if isinstance(comp.get("title"), str):
        att["title"] = comp["title"]
    if isinstance(bundle.get("timestamp"), str):
        att["creation"] = bundle["timestamp"]
    if not isinstance(att["language"], str):
        att.pop("language")
    dr["content"] = [{"attachment": att}]
    return dr


def _instant(ts: str) -> str:
    # DocumentReference.date is an instant: a date-only timestamp is not one.
    return ts if "T" in ts else ts + "T00:00:00Z"


async def retire(server: Server, ctx: RequestContext, t: WriteTx, owned: list[tuple[str, str, str, bool]]) -> int:
    """Mark the resources a withdrawn document wrote as entered-in-error (records are retired, not erased)."""
    n = 0
    for _fu, rt, rid, created in owned:
        if not created:
            continue
        cur = await t.current(rt, rid)
        if cur is None or cur.deleted:
            continue
        res = fhirjson.loads(cur.content)
        if rt == "Condition":
            res["verificationStatus"] = {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "entered-in-error"}]}
        elif rt in RETIRE:
            res[RETIRE[rt]] = "entered-in-error"
        else:
            continue
        await crud.update(server, ctx, rt, rid, res, tx=t)
        n += 1
    return n
