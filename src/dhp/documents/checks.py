"""Acceptance rules for a document Bundle, beyond what the profiles say.

Every problem becomes an :class:`Issue` whose expression names the entry (``Bundle.entry[3]…``), so a
sender sees all of them at once. The rules: FHIR's document rules (``bdl-9/10/11/3a/7/15/17``,
``cmp-1/2``), references from the Composition resolvable inside the Bundle or on the server, the
platform's life cycle (preliminary → final → amended, or entered-in-error; ``attester`` for final and
amended documents; ``Composition.identifier`` as the stable identity).
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Container
from typing import Any

from dhp.errors import Issue

#: Composition.status values a clinical document may have on this platform.
STATUSES = ("preliminary", "final", "amended", "entered-in-error")
#: Allowed status of a new version, by the status of the version it replaces.
TRANSITIONS = {
    "preliminary": ("preliminary", "final", "entered-in-error"),
    "final": ("amended", "entered-in-error"),
    "amended": ("amended", "entered-in-error"),
    "entered-in-error": (),
}

INTEGRATIONS = "https://dhp.uz/fhir/integrations/StructureDefinition/"
CORE = "https://dhp.uz/fhir/core/StructureDefinition/"
FORM_CS = "https://terminology.dhp.uz/CodeSystem/medical-document-form-cs"
FORM_096_PROFILE = INTEGRATIONS + "composition-birth"
FORM_003_PROFILE = INTEGRATIONS + "form-003-inpatient-medical-record-composition"
APGAR_CODES = frozenset({"9272-6", "9274-2", "9271-8"})  # LOINC 1-, 5- and 10-minute Apgar scores


def err(code: str, mid: str, msg: str, where: str) -> Issue:
    return Issue("error", code, msg, [where] if where else [], mid)


def arr(x: Any) -> list[Any]:
    """A JSON array property as a list, anything else as empty: these rules run before or beside the
    validator, which reports the wrong JSON type; they must not crash on it."""
    return x if isinstance(x, list) else []


def document_kind(composition: dict[str, Any]) -> str | None:
    """``form-096`` (birth), ``form-003`` (inpatient stay) or None, from the profile or the category."""
    meta = composition.get("meta") if isinstance(composition.get("meta"), dict) else {}
    profiles = [p.split("|")[0] for p in arr(meta.get("profile")) if isinstance(p, str)]
    if FORM_096_PROFILE in profiles:
        return "form-096"
    if FORM_003_PROFILE in profiles:
        return "form-003"
    for cat in arr(composition.get("category")):
        for c in arr(cat.get("coding")) if isinstance(cat, dict) else ():
            if isinstance(c, dict) and c.get("system") == FORM_CS and c.get("code") in ("form-096", "form-003"):
                return str(c["code"])
    return None


def codes(concept: Any) -> set[str]:
    if not isinstance(concept, dict):
        return set()
    return {str(c.get("code")) for c in arr(concept.get("coding")) if isinstance(c, dict) and c.get("code")}


def iter_refs(node: Any, path: str) -> list[tuple[str, str]]:
    """(reference string, FHIRPath-ish location) of every ``reference`` inside ``node``."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out.append((v, path))
            elif isinstance(v, dict | list) and k not in ("contained", "text"):
                out.extend(iter_refs(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(iter_refs(v, f"{path}[{i}]"))
    return out


class EntryIndex:
    """Resolves references inside a document Bundle (FHIR's rules: fullUrl, or Type/id against the base)."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.by_url: dict[str, int] = {}
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                continue
            fu = e.get("fullUrl")
            r = e.get("resource") if isinstance(e.get("resource"), dict) else None
            if isinstance(fu, str):
                self.by_url.setdefault(fu, i)
                # https://host/fhir/Patient/1 is also reachable as Patient/1
                if r is not None and r.get("id") and fu.endswith(f"/{r.get('resourceType')}/{r.get('id')}"):
                    self.by_url.setdefault(f"{r['resourceType']}/{r['id']}", i)

    def find(self, ref: str) -> int | None:
        return self.by_url.get(ref.split("#", 1)[0])


#: The longest identifier system or value, and entry fullUrl, the document registry keeps
#: (``dhp.store.documents``; PostgreSQL refuses longer text, SQLite would not).
IDENTIFIER_MAX = 512
FULL_URL_MAX = 1000


def _storable_identifier(ident: dict[str, Any]) -> bool:
    return all(isinstance(ident.get(k), str) and len(ident[k]) <= IDENTIFIER_MAX for k in ("system", "value"))


async def rule_issues(bundle: dict[str, Any], exists: Callable[[str, str], Awaitable[bool]],
                      types: Container[str] | None = None) -> list[Issue]:
    """Every violation of the document rules (not the profiles) in ``bundle``; ``types``: the resource types
    the server stores (an entry of another type cannot be split out of the document)."""
    issues: list[Issue] = []
    ident = bundle.get("identifier")
    if not isinstance(ident, dict) or not ident.get("system") or not ident.get("value"):
        issues.append(err("required", "doc-identifier",
                          "bdl-9: a document needs Bundle.identifier with system and value", "Bundle.identifier"))
    elif not _storable_identifier(ident):
        issues.append(err("value", "doc-identifier-too-long", "Bundle.identifier system and value must be "
                          f"strings of at most {IDENTIFIER_MAX} characters", "Bundle.identifier"))
    if not isinstance(bundle.get("timestamp"), str):
        issues.append(err("required", "doc-timestamp", "bdl-10: a document needs Bundle.timestamp",
                          "Bundle.timestamp"))
    if "issues" in bundle:
        issues.append(err("invariant", "doc-issues", "bdl-17: a document may not carry Bundle.issues",
                          "Bundle.issues"))
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        issues.append(err("required", "doc-empty", "a document needs entries, the first one a Composition",
                          "Bundle.entry"))
        return issues
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("resource"), dict):
            issues.append(err("required", "doc-entry-resource", f"bdl-3a: {where} has no resource", where))
            continue
        if not isinstance(e["resource"].get("resourceType"), str):
            # A rule, not only a profile error: lenient validation would let it through to the split.
            issues.append(err("structure", "doc-entry-resource", f"{where}.resource has no resourceType",
                              f"{where}.resource"))
            continue
        if types is not None and e["resource"]["resourceType"] not in types:
            issues.append(err("structure", "doc-entry-type", f"{where}.resource has resourceType "
                              f"{e['resource']['resourceType']!r}, which is not a FHIR R5 resource type",
                              f"{where}.resource"))
            continue
        if "request" in e or "response" in e:
            issues.append(err("invariant", "doc-entry-request",
                              f"bdl-3a: {where} of a document may not have request or response", where))
        fu = e.get("fullUrl")
        if not isinstance(fu, str) or not fu:
            issues.append(err("required", "doc-fullurl", f"bdl-15: {where} needs a fullUrl", f"{where}.fullUrl"))
        elif len(fu) > FULL_URL_MAX:
            issues.append(err("value", "doc-fullurl-too-long", f"{where}.fullUrl is longer than the "
                              f"{FULL_URL_MAX} characters the document registry keeps", f"{where}.fullUrl"))
        elif fu in seen:
            issues.append(err("invariant", "doc-fullurl-duplicate",
                              f"bdl-7: {where}.fullUrl {fu!r} repeats Bundle.entry[{seen[fu]}]", f"{where}.fullUrl"))
        else:
            seen[fu] = i
    first = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") != "Composition":
        issues.append(err("invariant", "doc-first-composition",
                          "bdl-11: the first entry of a document must be a Composition", "Bundle.entry[0].resource"))
        return issues
    comp = first
    cpath = "Bundle.entry[0].resource.ofType(Composition)"
    status = comp.get("status")
    if status not in STATUSES:
        issues.append(err("code-invalid", "doc-status",
                          f"Composition.status {status!r} is not a document status of this platform "
                          f"({', '.join(STATUSES)})", f"{cpath}.status"))
    if status in ("final", "amended") and not comp.get("attester"):
        issues.append(err("required", "doc-attester",
                          f"a {status} document must be attested: Composition.attester is required", f"{cpath}.attester"))
    cid = comp.get("identifier")
    cids = cid if isinstance(cid, list) else [cid] if isinstance(cid, dict) else []
    if not any(isinstance(x, dict) and x.get("system") and x.get("value") for x in cids):
        issues.append(err("required", "doc-composition-identifier",
                          "Composition.identifier (system and value) is required: it is the document's stable "
                          "identity across its versions", f"{cpath}.identifier"))
    elif not all(_storable_identifier(x) for x in cids if isinstance(x, dict) and x.get("system") and x.get("value")):
        issues.append(err("value", "doc-identifier-too-long", "Composition.identifier system and value must be "
                          f"strings of at most {IDENTIFIER_MAX} characters", f"{cpath}.identifier"))
    _sections(comp.get("section"), f"{cpath}.section", issues)
    index = EntryIndex(entries)
    # References from the Composition (header and sections) resolve inside the Bundle or on the server.
    for ref, where in iter_refs({k: v for k, v in comp.items() if k != "relatesTo"}, cpath):
        if ref.startswith("#") or index.find(ref) is not None:
            continue
        parts = ref.split("/")
        if not ref.startswith(("urn:", "http:", "https:")) and len(parts) == 2 and await exists(parts[0], parts[1]):
            continue
        issues.append(err("not-found", "doc-reference-unresolved",
                          f"{where}: reference {ref!r} resolves neither to an entry of the document (fullUrl) "
                          "nor to a resource on this server", where))
    # urn: references anywhere in the document must point at an entry.
    for i, e in enumerate(entries[1:], start=1):
        if not isinstance(e, dict) or not isinstance(e.get("resource"), dict):
            continue
        rt = e["resource"].get("resourceType")
        for ref, where in iter_refs(e["resource"], f"Bundle.entry[{i}].resource.ofType({rt})"):
            if ref.startswith("urn:") and index.find(ref) is None:
                issues.append(err("not-found", "doc-reference-unresolved",
                                  f"{where}: reference {ref!r} points at no entry of the document", where))
    return issues


def _sections(sections: Any, path: str, issues: list[Issue]) -> None:
    if not isinstance(sections, list):
        return
    for i, s in enumerate(sections):
        if not isinstance(s, dict):
            continue
        where = f"{path}[{i}]"
        has = bool(s.get("text")) or bool(s.get("entry")) or bool(s.get("section"))
        if not has:
            issues.append(err("invariant", "cmp-1", f"cmp-1: {where} must contain text, entries or sub-sections",
                              where))
        if s.get("emptyReason") and s.get("entry"):
            issues.append(err("invariant", "cmp-2", f"cmp-2: {where} may only have an emptyReason if it is empty",
                              f"{where}.emptyReason"))
        _sections(s.get("section"), f"{where}.section", issues)


def with_required_profiles(bundle: dict[str, Any], kind: str | None) -> dict[str, Any]:
    """A copy of ``bundle`` whose entries also declare the profiles the document kind requires.

    The validator then checks each entry against them and reports paths with the entry index.
    """
    if kind is None:
        return bundle
    entries = arr(bundle.get("entry"))
    comp = entries[0].get("resource") or {}
    # Only string references and fullUrls take part: other JSON types are reported by the validator.
    subjects = {r["reference"] for r in arr(comp.get("subject")) if isinstance(r, dict)
                and isinstance(r.get("reference"), str)}
    out = dict(bundle)
    new_entries = []
    for i, e in enumerate(entries):
        r = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(r, dict):
            new_entries.append(e)
            continue
        fu = e.get("fullUrl")
        want = required_profile(kind, i, r, isinstance(fu, str) and fu in subjects)
        if want is None:
            new_entries.append(e)
            continue
        meta = dict(r.get("meta") or {}) if isinstance(r.get("meta"), dict) else {}
        profs = [p for p in arr(meta.get("profile")) if isinstance(p, str)] if isinstance(
            meta.get("profile"), list) else []
        if want in [p.split("|")[0] for p in profs]:
            new_entries.append(e)
            continue
        meta["profile"] = [*profs, want]
        new_entries.append({**e, "resource": {**copy.copy(r), "meta": meta}})
    out["entry"] = new_entries
    return out


def required_profile(kind: str, index: int, r: dict[str, Any], is_subject: bool) -> str | None:
    rt = r.get("resourceType")
    if not isinstance(rt, str):  # reported by the rules and the validator; not a key to look up
        return None
    if kind == "form-096":
        if index == 0:
            return FORM_096_PROFILE
        if rt == "Patient":
            return INTEGRATIONS + "patient-birth" if is_subject else CORE + "uz-core-patient"
        if rt == "Encounter":
            return INTEGRATIONS + "encounter-birth"
        if rt == "Observation":
            return INTEGRATIONS + ("observation-apgar" if codes(r.get("code")) & APGAR_CODES
                                   else "observation-birth")
        if rt == "RelatedPerson":
            return INTEGRATIONS + "related-person-birth"
    if kind == "form-003":
        if index == 0:
            return FORM_003_PROFILE
        if rt == "Condition":
            return CORE + "uz-core-clinical-condition"
        if rt == "Observation":
            return CORE + "uz-core-observation"
        if rt == "Encounter":
            return CORE + "uz-core-encounter"
    common = {"Patient": "uz-core-patient", "Practitioner": "uz-core-practitioner",
              "PractitionerRole": "uz-core-practitioner-role", "Organization": "uz-core-organization",
              "Location": "uz-core-location", "RelatedPerson": "uz-core-relatedperson"}
    if kind is not None and rt in common:
        return CORE + common[rt]
    return None
