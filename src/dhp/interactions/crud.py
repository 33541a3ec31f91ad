"""Instance and type interactions: read, vread, create, update, patch, delete, history.

Each write runs in one store transaction (its own, or the caller's ``tx`` inside a transaction Bundle):
version check → validation → resource bytes + history + search index rows, all or nothing.
"""

from __future__ import annotations

import copy
import functools
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from dhp import fhirjson
from dhp.conformance import CANONICAL_TYPES
from dhp.errors import FHIRError, Issue, bad_request, not_found
from dhp.instants import DateError, date_range
from dhp.interactions.context import RequestContext, Server
from dhp.store import StoredResource, WriteTx, new_id, now_us, retry_conflicts

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
ETAG_RE = re.compile(r'^\s*(?:W/)?"?([0-9]+)"?\s*$')


# ---------------------------------------------------------------- small helpers


@functools.lru_cache(maxsize=64)
def _second(s: int) -> tuple[str, str]:
    """(instant prefix, HTTP date) of one whole second: every write formats its time twice, and strftime
    cost more than the rest of stamping a resource. Writes close in time share the second."""
    dt = datetime.fromtimestamp(s, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S."), dt.strftime("%a, %d %b %Y %H:%M:%S GMT")


def instant(us: int) -> str:
    """FHIR instant (UTC, milliseconds) from microseconds since the epoch."""
    s, rest = divmod(us, 1_000_000)
    return f"{_second(s)[0]}{rest // 1000:03d}Z"


def http_date(us: int) -> str:
    return _second(us // 1_000_000)[1]


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_etag(value: str, header: str = "If-Match") -> int:
    m = ETAG_RE.match(value)
    if not m:
        raise FHIRError(400, f"{header} must be a version ETag like W/\"3\", not {value!r}", "invalid",
                        message_id="bad-etag")
    return int(m.group(1))


def check_type(server: Server, rtype: str) -> None:
    if rtype not in server.registry.resource_types():
        raise FHIRError(404, f"Unknown resource type '{rtype}'", "not-supported", message_id="unknown-type")


def check_id(rid: str) -> None:
    if not ID_RE.fullmatch(rid):
        raise bad_request(f"'{rid}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)", "id", "bad-id")


def parse_resource(source: bytes) -> dict[str, Any]:
    if not source.strip():
        raise bad_request("The request body is empty; a FHIR resource was expected", message_id="empty-body",
                          code="structure")
    try:
        body = fhirjson.loads(source)
    except fhirjson.JSONError as e:
        raise FHIRError(400, f"Malformed JSON: {e}", "structure", message_id="malformed-json") from None
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FHIRError(400, "The body is not a FHIR resource: a JSON object with 'resourceType' was expected",
                        "structure", message_id="not-a-resource")
    return body


def encode(resource: dict[str, Any]) -> bytes:
    """The resource as JSON bytes; 400 for what parsed but cannot be written back: a lone UTF-16 surrogate
    (``"\\ud800"``) or nesting deeper than the encoder allows. Checked here, before anything is stored."""
    try:
        return fhirjson.dumps(resource)
    except TypeError as e:  # orjson.JSONEncodeError is a TypeError
        raise bad_request(f"The resource cannot be stored as JSON: {e}", message_id="invalid-value") from None


#: Conformance resources that change the platform for every client once written (Questionnaires and other
#: canonical resources are content, written with their resource scopes alone).
PLATFORM_TYPES = frozenset({"StructureDefinition", "SearchParameter", "CompartmentDefinition", "ValueSet",
                            "CodeSystem", "ConceptMap", "NamingSystem", "OperationDefinition",
                            "CapabilityStatement"})


def authorize(server: Server, ctx: RequestContext, interaction: str, rtype: str,
              resource: dict[str, Any] | None = None) -> None:
    """SMART scope check for one interaction; with a resource, the compartment / query-filter check too."""
    p = ctx.principal
    if p is None:
        return
    if not p.can(interaction, rtype):
        raise FHIRError(403, f"The access token's scopes do not allow '{interaction}' on {rtype}", "forbidden",
                        message_id="insufficient-scope")
    if interaction in ("c", "u", "d") and rtype in PLATFORM_TYPES and not p.is_admin:
        # Profiles, search parameters, compartments and terminology written through the API change how the
        # platform validates, indexes and grants access for every client: the operator's job (the national
        # CapabilityStatement offers clients read and search of them only).
        raise FHIRError(403, f"Writing {rtype} resources changes the platform for every client: it needs the "
                        "dhp/admin scope", "forbidden", message_id="insufficient-scope")
    if resource is not None and server.check_resource is not None and needs_resource_check(p, interaction, rtype):
        server.check_resource(server, p, interaction, resource)


def needs_resource_check(principal: Any, interaction: str, rtype: str) -> bool:
    if getattr(principal, "patient", None):
        return True
    qf = getattr(principal, "query_filters", None)
    return bool(qf and qf(interaction, rtype))


def patient_key(rtype: str, rid: str, resource: dict[str, Any]) -> str | None:
    """The patient compartment a resource belongs to (the future sharding key)."""
    if rtype == "Patient":
        return rid
    for el in ("subject", "patient", "beneficiary"):
        ref = resource.get(el)
        if isinstance(ref, dict):
            r = ref.get("reference")
            if isinstance(r, str) and r.startswith("Patient/"):
                pid = r[8:].split("/", 1)[0]
                return pid if ID_RE.fullmatch(pid) else None  # not an id: no compartment to key by
    return None


@dataclass
class WriteResult:
    rec: StoredResource | None
    status: int
    resource: dict[str, Any] | None = None
    issues: list[Issue] = field(default_factory=list)


# ---------------------------------------------------------------- reads


async def read(server: Server, ctx: RequestContext, rtype: str, rid: str, *,
               tx: WriteTx | None = None) -> StoredResource:
    """The current version; inside ``tx`` (a transaction Bundle's GET), as the transaction has written it."""
    check_type(server, rtype)
    authorize(server, ctx, "r", rtype)
    rec = await (tx.current(rtype, rid) if tx is not None else server.store.read(rtype, rid))
    if rec is None:
        raise not_found(f"{rtype}/{rid} is not known", "resource-not-found")
    if rec.deleted:
        raise FHIRError(410, f"{rtype}/{rid} was deleted", "deleted", message_id="resource-deleted",
                        headers={"ETag": etag(rec.version)})
    if ctx.principal is not None and needs_resource_check(ctx.principal, "r", rtype):
        authorize(server, ctx, "r", rtype, fhirjson.loads(rec.content))
    return rec


async def vread(server: Server, ctx: RequestContext, rtype: str, rid: str, vid: str) -> StoredResource:
    check_type(server, rtype)
    authorize(server, ctx, "r", rtype)
    # ASCII digits only ("²".isdigit() is true) and within the store's 64-bit version column.
    if not (vid.isascii() and vid.isdigit()) or len(vid) > 18:
        raise not_found(f"{rtype}/{rid} has no version '{vid}'", "version-not-found")
    found = await server.store.vread(rtype, rid, int(vid))
    if found is None:
        raise not_found(f"{rtype}/{rid} has no version {vid}", "version-not-found")
    rec, _method = found
    if rec.deleted:
        raise FHIRError(410, f"Version {vid} of {rtype}/{rid} is a deletion", "deleted",
                        message_id="resource-deleted")
    if ctx.principal is not None and needs_resource_check(ctx.principal, "r", rtype):
        authorize(server, ctx, "r", rtype, fhirjson.loads(rec.content))
    return rec


# ---------------------------------------------------------------- writes


_TERMINOLOGY_TYPES = frozenset({"CodeSystem", "ValueSet", "ConceptMap", "NamingSystem"})


def _validate(server: Server, resource: dict[str, Any], source: bytes | None) -> list[Issue]:
    mode = server.settings.validation
    issues: list[Issue] = []
    # Terminology definitions are checked for their own consistency (duplicate codes, bad filters, …) even
    # with profile validation off: a broken CodeSystem would break every expansion that uses it.
    if server.terminology is not None and resource.get("resourceType") in _TERMINOLOGY_TYPES:
        issues += server.terminology.check_definition(resource)
    if server.search is not None and resource.get("resourceType") == "SearchParameter":
        # Refused in every validation mode: a parameter takes effect at once on every write of its base types.
        bad = server.search.check_definition(resource)
        if bad:
            raise FHIRError(422, bad[0].diagnostics, issues=bad)
    if server.validator is not None and resource.get("resourceType") == "StructureDefinition":
        # Likewise a profile that cannot be used: every resource claiming it would fail (or crash) later.
        unusable = server.validator.check_definition(resource)
        if unusable:
            raise FHIRError(422, unusable[0].diagnostics, issues=unusable)
    if mode != "off" and server.validator is not None:
        issues += server.validator.validate(resource, source=source)
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    if errors and mode in ("strict", "off"):
        raise FHIRError(422, errors[0].diagnostics, issues=issues)
    if mode == "lenient":
        for i in errors:
            i.severity = "warning"
    return issues


def _stamp(resource: dict[str, Any], rid: str, version: int, ts: int) -> dict[str, Any]:
    """The resource as stored: resourceType, id and meta first, server-owned meta fields set."""
    meta = dict(resource.get("meta") or {}) if isinstance(resource.get("meta"), dict) else {}
    if "meta" in resource and not isinstance(resource["meta"], dict):
        raise bad_request("meta must be an object", "meta")
    meta["versionId"] = str(version)
    meta["lastUpdated"] = instant(ts)
    out: dict[str, Any] = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
    for k, v in resource.items():
        if k not in out:
            out[k] = v
    return out


async def _store(server: Server, tx: WriteTx, rtype: str, rid: str, resource: dict[str, Any],
                 version: int, method: str, cur: StoredResource | None, ts: int,
                 generated: bool = False) -> StoredResource:
    """Write ``resource`` as the next version; ``cur``: the version it replaces (None: a create);
    ``generated``: ``rid`` was just made by ``new_id()``."""
    if rtype == "Provenance" and server.documents is not None:
        # A signature over a stored document must verify, however it arrives.
        await server.documents.check_provenance(resource, tx)
    content = encode(resource)
    key = server.search.index_key(rtype) if server.search is not None else None
    rec = StoredResource(rtype, rid, version, ts, False, content, key)
    await tx.put(rec, method, exists_before=cur is not None, patient=patient_key(rtype, rid, resource),
                 generated=generated, prev=cur)
    if server.search is not None:
        await server.search.index(tx, rtype, rid, resource, old=cur)
    if rtype in CANONICAL_TYPES:
        await _conformance_changed(server, tx, rtype, resource, cur)
    return rec


async def _conformance_changed(server: Server, tx: WriteTx, rtype: str, new: dict[str, Any] | None,
                               cur: StoredResource | None) -> None:
    """``new``: the resource as written (None: deleted); ``cur``: the version it replaces."""
    tx.mark_conformance_changed()
    if server.search is not None:
        server.search.changed_here(server.store)
        if rtype == "SearchParameter":
            old = fhirjson.fast_loads(cur.content) if cur is not None and not cur.deleted else None
            await server.search.record_change(tx, new, old)
    if server.sync_conformance not in tx.after_commit:
        tx.after_commit.append(server.sync_conformance)


async def _in_tx(server: Server, tx: WriteTx | None, fn: Any) -> Any:
    if tx is not None:
        return await fn(tx)

    attempts = 0

    async def once() -> Any:
        nonlocal attempts
        attempts += 1
        # The first two attempts read without locking (PostgreSQL: fewer round trips; a write that read too
        # early usually fails in the process, before it is sent); later ones lock, so heavy contention on one
        # resource still makes progress.
        async with server.store.begin(optimistic=attempts <= 2) as own:
            return await fn(own)

    return await retry_conflicts(once)


async def create(server: Server, ctx: RequestContext, rtype: str, resource: dict[str, Any],
                 source: bytes | None = None, *, tx: WriteTx | None = None, if_none_exist: str | None = None,
                 rid: str | None = None) -> WriteResult:
    check_type(server, rtype)
    if resource.get("resourceType") != rtype:
        raise bad_request(f"resourceType '{resource.get('resourceType')}' does not match the URL type '{rtype}'",
                          "resourceType", "type-mismatch")
    authorize(server, ctx, "c", rtype, resource)
    if rtype == "Bundle" and resource.get("type") == "document" and server.documents is not None:
        # Clinical documents have their own path: profile checks, immutability, index, split, signatures.
        return await server.documents.create(server, ctx, resource, source, tx=tx, rid=rid)
    generated = rid is None
    rid = rid or new_id()
    ts = now_us()
    stamped = _stamp(resource, rid, 1, ts)
    issues = _validate(server, stamped, source)

    async def work(t: WriteTx) -> WriteResult:
        if if_none_exist:
            existing = await conditional_match(server, rtype, if_none_exist, t)
            if len(existing) > 1:
                raise FHIRError(412, f"If-None-Exist matched {len(existing)} {rtype} resources", "duplicate",
                                message_id="conditional-multiple")
            if existing:
                cur = await t.current(rtype, existing[0])
                return WriteResult(cur, 200, fhirjson.loads(cur.content) if cur else None)
        rec = await _store(server, t, rtype, rid, stamped, 1, "POST", None, ts, generated)
        return WriteResult(rec, 201, stamped, issues)

    return await _in_tx(server, tx, work)


def check_precondition(server: Server, cur: StoredResource | None, if_match: str | None, rtype: str,
                       rid: str) -> None:
    if if_match is None:
        if server.settings.require_if_match and cur is not None and not cur.deleted:
            raise FHIRError(412, "Version is mismatch: If-Match is required on every update", "conflict",
                            message_id="if-match-required")
        return
    wanted = parse_etag(if_match)
    if cur is None or cur.deleted:
        raise FHIRError(412, f"Version is mismatch: {rtype}/{rid} does not exist (If-Match {if_match})",
                        "conflict", message_id="version-mismatch")
    if cur.version != wanted:
        raise FHIRError(412, f"Version is mismatch: {rtype}/{rid} is at version {cur.version}, not {wanted}",
                        "conflict", message_id="version-mismatch", headers={"ETag": etag(cur.version)})


async def conditional_update(server: Server, ctx: RequestContext, rtype: str, query: str, resource: dict[str, Any],
                             source: bytes | None = None, *, if_match: str | None = None) -> WriteResult:
    """``PUT [type]?query``: the match and the write in one transaction. Transactions matching the same
    condition take turns (``WriteTx.lock_condition``), so concurrent requests that find no match create one
    resource, and the others update it."""

    async def work(t: WriteTx) -> WriteResult:
        body = copy.deepcopy(resource)  # a retried attempt starts from the resource as sent
        ids = await conditional_match(server, rtype, query, t)
        if len(ids) > 1:
            raise FHIRError(412, f"Conditional update matched {len(ids)} resources", "duplicate",
                            message_id="conditional-multiple")
        if ids:
            if body.get("id") not in (None, ids[0]):
                raise bad_request(f"Resource id '{body.get('id')}' differs from the match '{ids[0]}'", "id",
                                  "id-mismatch")
            body["id"] = ids[0]
            return await update(server, ctx, rtype, ids[0], body, source, if_match=if_match, tx=t)
        if isinstance(body.get("id"), str) and body["id"]:
            return await update(server, ctx, rtype, body["id"], body, source, tx=t)
        return await create(server, ctx, rtype, body, source, tx=t)

    return await _in_tx(server, None, work)  # type: ignore[no-any-return]


async def update(server: Server, ctx: RequestContext, rtype: str, rid: str, resource: dict[str, Any],
                 source: bytes | None = None, *, if_match: str | None = None, tx: WriteTx | None = None,
                 method: str = "PUT") -> WriteResult:
    check_type(server, rtype)
    check_id(rid)
    if resource.get("resourceType") != rtype:
        raise bad_request(f"resourceType '{resource.get('resourceType')}' does not match the URL type '{rtype}'",
                          "resourceType", "type-mismatch")
    if "id" not in resource:
        raise bad_request("The resource must carry an id equal to the id in the URL", "id", "id-missing")
    if resource.get("id") != rid:
        raise bad_request(f"Resource id '{resource.get('id')}' does not match the URL id '{rid}'", "id",
                          "id-mismatch")
    authorize(server, ctx, "u", rtype, resource)

    async def work(t: WriteTx) -> WriteResult:
        cur = await t.current(rtype, rid)
        check_precondition(server, cur, if_match, rtype, rid)
        if server.documents is not None and cur is not None:
            server.documents.check_change(rtype, cur, "update")
        if (rtype == "Bundle" and resource.get("type") == "document" and server.documents is not None
                and (cur is None or cur.deleted)):
            # A document created by PUT follows every document rule, as one created by POST does.
            return await server.documents.create(server, ctx, resource, source, tx=t, rid=rid)
        if cur is not None and not cur.deleted and ctx.principal is not None \
                and needs_resource_check(ctx.principal, "u", rtype):
            authorize(server, ctx, "u", rtype, fhirjson.loads(cur.content))
        version = cur.version + 1 if cur else 1
        ts = now_us()
        stamped = _stamp(resource, rid, version, ts)
        issues = _validate(server, stamped, source)
        rec = await _store(server, t, rtype, rid, stamped, version, method, cur, ts)
        return WriteResult(rec, 200 if cur is not None and not cur.deleted else 201, stamped, issues)

    return await _in_tx(server, tx, work)


async def patch(server: Server, ctx: RequestContext, rtype: str, rid: str, patch_body: Any, kind: str,
                *, if_match: str | None = None, tx: WriteTx | None = None) -> WriteResult:
    """``kind`` is ``json-patch`` or ``fhirpath``."""
    from dhp.interactions.patch import apply_fhirpath_patch, apply_json_patch

    check_type(server, rtype)
    authorize(server, ctx, "u", rtype)
    if kind == "fhirpath" and (not isinstance(patch_body, dict) or patch_body.get("resourceType") != "Parameters"):
        raise bad_request("A FHIRPath Patch body must be a Parameters resource", message_id="patch-invalid")

    async def work(t: WriteTx) -> WriteResult:
        cur = await t.current(rtype, rid)
        if cur is None:
            raise not_found(f"{rtype}/{rid} is not known", "resource-not-found")
        if cur.deleted:
            raise FHIRError(410, f"{rtype}/{rid} was deleted", "deleted", message_id="resource-deleted")
        check_precondition(server, cur, if_match, rtype, rid)
        if server.documents is not None:
            server.documents.check_change(rtype, cur, "patch")
        current = fhirjson.loads(cur.content)
        authorize(server, ctx, "u", rtype, current)
        try:
            patched = apply_json_patch(current, patch_body) if kind == "json-patch" \
                else apply_fhirpath_patch(current, patch_body)
        except RecursionError:  # a value nested deeper than copying it allows (it could not be stored anyway)
            raise bad_request("The patch is nested too deeply", message_id="patch-invalid") from None
        if patched.get("resourceType") != rtype or patched.get("id") != rid:
            raise FHIRError(422, "A patch may not change resourceType or id", "processing",
                            message_id="patch-changes-identity")
        version = cur.version + 1
        ts = now_us()
        stamped = _stamp(patched, rid, version, ts)
        issues = _validate(server, stamped, encode(stamped))
        rec = await _store(server, t, rtype, rid, stamped, version, "PATCH", cur, ts)
        return WriteResult(rec, 200, stamped, issues)

    return await _in_tx(server, tx, work)


async def delete(server: Server, ctx: RequestContext, rtype: str, rid: str, *, if_match: str | None = None,
                 tx: WriteTx | None = None) -> WriteResult:
    check_type(server, rtype)
    authorize(server, ctx, "d", rtype)

    async def work(t: WriteTx) -> WriteResult:
        cur = await t.current(rtype, rid)
        if cur is None:
            raise not_found(f"{rtype}/{rid} is not known", "resource-not-found")
        if cur.deleted:
            return WriteResult(cur, 204)
        if if_match is not None:
            check_precondition(server, cur, if_match, rtype, rid)
        if server.documents is not None:
            server.documents.check_change(rtype, cur, "delete")
        if ctx.principal is not None and needs_resource_check(ctx.principal, "d", rtype):
            authorize(server, ctx, "d", rtype, fhirjson.loads(cur.content))
        ts = now_us()
        rec = StoredResource(rtype, rid, cur.version + 1, ts, True, b"")
        await t.put(rec, "DELETE", exists_before=True, prev=cur)
        if server.search is not None:
            await server.search.unindex(t, rtype, rid)
        if rtype in CANONICAL_TYPES:
            await _conformance_changed(server, t, rtype, None, cur)
        return WriteResult(rec, 200)

    return await _in_tx(server, tx, work)


def condition_params(query: str) -> list[tuple[str, str]] | None:
    """A conditional query's parameters (None: malformed)."""
    from urllib.parse import parse_qsl

    try:
        return parse_qsl(query.lstrip("?"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None


async def conditional_match(server: Server, rtype: str, query: str, tx: WriteTx | None = None) -> list[str]:
    """Ids of ``rtype`` resources matching a search query string (conditional create/update/delete)."""

    params = condition_params(query)
    if params is None:
        raise bad_request(f"Malformed conditional query {query!r}", message_id="bad-conditional")
    if not params:
        raise bad_request("A conditional operation needs search parameters", message_id="bad-conditional")
    if tx is not None:
        # Transactions matching one condition take turns until they commit: two that both found no match
        # would both create (conditional create/update; the spec allows at most one).
        await tx.lock_condition(rtype, params)
    if server.search is not None:
        from dhp.interactions.search import find_ids

        return list(await find_ids(server, rtype, params, tx=tx))
    # Without the search module only _id can be evaluated; anything else must not match silently.
    if all(k == "_id" for k, _ in params):
        ids = {v for _, v in params}
        out = []
        for i in ids:
            cur = await tx.current(rtype, i) if tx is not None else await server.store.read(rtype, i)
            if cur is not None and not cur.deleted:
                out.append(i)
        return out
    raise FHIRError(400, "This server cannot evaluate that conditional query", "not-supported",
                    message_id="conditional-unsupported")


# ---------------------------------------------------------------- history


def entry_for_history(ctx: RequestContext, rec: StoredResource, method: str) -> dict[str, Any]:
    url = f"{rec.type}/{rec.id}"
    e: dict[str, Any] = {"fullUrl": f"{ctx.base_url}/{url}"}
    if not rec.deleted:
        e["resource"] = fhirjson.loads(rec.content)
    req_method = {"PATCH": "PATCH", "DELETE": "DELETE", "POST": "POST"}.get(method, "PUT")
    e["request"] = {"method": req_method, "url": url if req_method != "POST" else rec.type}
    status = "201 Created" if rec.version == 1 and not rec.deleted else ("204 No Content" if rec.deleted else "200 OK")
    e["response"] = {"status": status, "etag": etag(rec.version), "lastModified": instant(rec.last_updated)}
    return e


def parse_instant_param(name: str, value: str) -> tuple[int, int]:
    """A FHIR date/dateTime/instant as the range [low, high) in µs (a date is a range)."""
    v = value.strip()
    for prefix in ("eq", "le", "lt", "ge", "gt"):
        if v.startswith(prefix) and len(v) > 2 and v[2].isdigit():
            v = v[2:]
    try:
        lo, hi = date_range(v)
    except DateError as e:
        raise bad_request(f"{name}: '{value}' is not a valid FHIR date/time ({e})", name, "bad-date") from None
    return lo, hi + 1


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    if name not in params:
        return default
    try:
        n = int(params[name])
    except ValueError:
        raise bad_request(f"{name} must be an integer, not {params[name]!r}", name, "bad-integer") from None
    if n < lo:
        raise bad_request(f"{name} must be at least {lo}", name, "bad-integer")
    return min(n, hi)


async def history(server: Server, ctx: RequestContext, rtype: str | None, rid: str | None,
                  query: list[tuple[str, str]]) -> dict[str, Any]:
    if rtype:
        check_type(server, rtype)
        authorize(server, ctx, "r", rtype)
    elif ctx.principal is not None and not ctx.principal.can("r", "*"):
        raise FHIRError(403, "System history needs read access to all resource types", "forbidden",
                        message_id="insufficient-scope")
    params = dict(query)
    count = _int_param(params, "_count", server.settings.default_count, 0, server.settings.max_count)
    offset = _int_param(params, "_offset", 0, 0, 10**9)
    pin = _int_param(params, "_page_max", 0, 0, 2**62) if "_page_max" in params else None
    since = parse_instant_param("_since", params["_since"])[0] if "_since" in params else None
    at = parse_instant_param("_at", params["_at"]) if "_at" in params else None
    if rid is not None:
        rec = await server.store.read(rtype or "", rid)
        if rec is None:
            raise not_found(f"{rtype}/{rid} is not known", "resource-not-found")
        if ctx.principal is not None and needs_resource_check(ctx.principal, "r", rtype or "") and not rec.deleted:
            authorize(server, ctx, "r", rtype or "", fhirjson.loads(rec.content))
    page = await server.store.history(rtype, rid, since=since, at=at, count=count, offset=offset, max_seq=pin)
    path = "/".join(p for p in (rtype, rid) if p)
    base = f"{ctx.base_url}/{path}/_history" if path else f"{ctx.base_url}/_history"
    keep = [(k, v) for k, v in query if k in ("_since", "_at", "_count")]

    def link(rel: str, off: int) -> dict[str, str]:
        q = [*keep, ("_page_max", str(page.max_seq)), ("_offset", str(off))]
        return {"relation": rel, "url": f"{base}?{urlencode(q)}"}

    links = [{"relation": "self", "url": f"{base}?{urlencode(query)}" if query else base}]
    if count and offset + count < page.total:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    if count:
        links.append(link("first", 0))
    entries = []
    for rec, method in page.entries:
        if ctx.principal is not None and not rec.deleted and needs_resource_check(ctx.principal, "r", rec.type):
            try:
                authorize(server, ctx, "r", rec.type, fhirjson.loads(rec.content))
            except FHIRError:
                continue
        entries.append(entry_for_history(ctx, rec, method))
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": instant(now_us())},
            "type": "history", "total": page.total, "link": links, "entry": entries}
