"""``batch`` and ``transaction`` Bundles posted to the FHIR base.

A transaction runs in one store transaction, in the spec's order (DELETE, POST, PUT/PATCH, GET/HEAD),
with ``urn:uuid:`` (and other) fullUrls rewritten to the ids the server assigns. Any failure rolls back
everything and answers with an OperationOutcome naming the entry. A batch runs each entry on its own.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from dhp import fhirjson
from dhp.errors import FHIRError, Issue, bad_request, outcome
from dhp.interactions import crud
from dhp.interactions.context import RequestContext, Server
from dhp.store import WriteTx, new_id, now_us, retry_conflicts, unavailable, unstorable_value

log = logging.getLogger("dhp.api")

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


@dataclass
class _Entry:
    index: int
    method: str
    url: str
    path: list[str]
    query: str
    resource: dict[str, Any] | None
    full_url: str | None
    request: dict[str, Any]
    #: Transaction only: the ``Type/id`` a conditional create or update resolved to before any entry ran.
    target: str | None = None


def _parse_entries(bundle: dict[str, Any]) -> list[_Entry]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise bad_request("Bundle.entry must be an array", "Bundle.entry")
    out = []
    for i, e in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(e, dict):
            raise bad_request(f"{where} must be an object", where)
        req = e.get("request")
        if not isinstance(req, dict) or not isinstance(req.get("method"), str) or not isinstance(req.get("url"), str):
            raise bad_request(f"{where}.request with method and url is required in a batch/transaction",
                              f"{where}.request", "bundle-request-missing")
        for key in ("ifMatch", "ifNoneExist", "ifNoneMatch", "ifModifiedSince"):
            if key in req and not isinstance(req[key], str):
                raise bad_request(f"{where}.request.{key} must be a string", f"{where}.request.{key}")
        full_url = e.get("fullUrl")
        if full_url is not None and not isinstance(full_url, str):
            # It keys the reference rewriting: a list or object there is a malformed entry, not a 500.
            raise bad_request(f"{where}.fullUrl must be a string", f"{where}.fullUrl")
        method = req["method"].upper()
        if method not in _ORDER:
            raise bad_request(f"{where}.request.method '{req['method']}' is not allowed", f"{where}.request.method")
        url = req["url"]
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. "http://[x": an unclosed IPv6 host
            raise bad_request(f"{where}.request.url {url!r} is not a URL", f"{where}.request.url") from None
        path = [p for p in parts.path.split("/") if p]
        res = e.get("resource")
        if res is not None and (not isinstance(res, dict) or not isinstance(res.get("resourceType"), str)):
            raise bad_request(f"{where}.resource is not a FHIR resource", f"{where}.resource", "not-a-resource")
        if method in ("POST", "PUT") and res is None:
            raise bad_request(f"{where}: {method} needs a resource", f"{where}.resource")
        if method == "PATCH" and res is None:
            raise bad_request(f"{where}: PATCH needs a Parameters or Binary resource", f"{where}.resource")
        out.append(_Entry(i, method, url, path, parts.query, res, full_url, req))
    return out


def _rewrite(node: Any, mapping: dict[str, str], server: Server | None = None) -> Any:
    """Replace links to bundle-local fullUrls with the assigned ``Type/id``: in references and in elements of the
    types the spec names (uri, url, canonical, oid, uuid), and in the narrative's ``href``/``src``. A string of
    another type that happens to equal a fullUrl (an identifier's value ``urn:uuid:…``) is data and stays.
    Without element definitions (no validation module) every string equal to a fullUrl is replaced."""
    validator = getattr(server, "validator", None) if server is not None else None
    if validator is not None and isinstance(node, dict) and isinstance(node.get("resourceType"), str):
        km = validator.keymap(None, node["resourceType"])
        if km:
            _rewrite_typed(validator, node, km, mapping)
            return node
    return _rewrite_any(node, mapping)


def _rewrite_any(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and v in mapping:
                node[k] = mapping[v]
            else:
                _rewrite_any(v, mapping)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, str) and v in mapping:
                node[i] = mapping[v]
            else:
                _rewrite_any(v, mapping)
    return node


#: Primitive types whose values are links the spec says a transaction rewrites.
_LINK_TYPES = frozenset({"uri", "url", "canonical", "oid", "uuid"})
_RESOURCE_TYPES = frozenset({"Resource", "DomainResource"})


def _rewrite_typed(validator: Any, node: dict[str, Any], km: dict[str, Any], mapping: dict[str, str]) -> None:
    for k, v in node.items():
        hit = km.get(k)
        if hit is None:
            continue  # not an element of this type (validation reports it): left as posted
        child, tcode = hit
        items = v if isinstance(v, list) else [v]
        for i, item in enumerate(items):
            new = _rewrite_value(validator, item, child, tcode, mapping)
            if new is not item:
                if isinstance(v, list):
                    v[i] = new
                else:
                    node[k] = new


def _rewrite_value(validator: Any, value: Any, elem: Any, tcode: str | None, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        if tcode in _LINK_TYPES:
            return mapping.get(value, value)
        if tcode == "xhtml":
            return _rewrite_xhtml(value, mapping)
        return value
    if not isinstance(value, dict):
        return value
    if tcode in _RESOURCE_TYPES or (tcode is None and isinstance(value.get("resourceType"), str)):
        rtype = value.get("resourceType")
        km = validator.keymap(None, rtype) if isinstance(rtype, str) else {}
    else:
        if tcode == "Reference" and isinstance(value.get("reference"), str):
            value["reference"] = mapping.get(value["reference"], value["reference"])
        km = validator.keymap(elem, tcode or "")
    if km:
        _rewrite_typed(validator, value, km, mapping)
    return value


def _rewrite_xhtml(div: str, mapping: dict[str, str]) -> str:
    for local, target in mapping.items():
        if local in div:
            for q in ('"', "'"):
                div = div.replace(f"href={q}{local}{q}", f"href={q}{target}{q}")
                div = div.replace(f"src={q}{local}{q}", f"src={q}{target}{q}")
    return div


def _response(ctx: RequestContext, res: crud.WriteResult, prefer_return: str) -> dict[str, Any]:
    status = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}.get(res.status, str(res.status))
    r: dict[str, Any] = {"status": status}
    e: dict[str, Any] = {}
    if res.rec is not None:
        if res.status == 201 or res.status == 200:
            r["location"] = f"{res.rec.type}/{res.rec.id}/_history/{res.rec.version}"
            e["fullUrl"] = f"{ctx.base_url}/{res.rec.type}/{res.rec.id}"
        r["etag"] = crud.etag(res.rec.version)
        r["lastModified"] = crud.instant(res.rec.last_updated)
    if res.issues or prefer_return == "OperationOutcome":
        r["outcome"] = outcome(res.issues)  # none: "All OK", as the single-resource API answers
    if prefer_return == "representation" and res.resource is not None and res.status in (200, 201):
        e["resource"] = res.resource
    e["response"] = r
    return e


def _conditions(entries: list[_Entry]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Every conditional search a transaction's entries will run (ifNoneExist, ``Type?query`` urls and
    references): their locks are taken together, in one order, before any entry runs."""
    for e in entries:
        queries: list[tuple[str, str]] = []
        if e.method == "POST" and isinstance(e.request.get("ifNoneExist"), str) and len(e.path) == 1:
            queries.append((e.path[0], e.request["ifNoneExist"]))
        elif e.method in ("PUT", "DELETE") and e.query and len(e.path) == 1:
            queries.append((e.path[0], e.query))
        if e.method in ("POST", "PUT") and e.resource is not None:
            queries += [(rtype, q) for _node, ref in _conditional_refs(e.resource)
                        for rtype, _, q in [ref.partition("?")]]
        for rtype, query in queries:
            params = crud.condition_params(query)
            if params:
                yield rtype, params


def _conditional_refs(resource: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """The elements of ``resource`` holding a conditional reference (``Patient?identifier=…``), and it."""
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and "?" in ref and not ref.startswith(("http:", "https:", "urn:")):
                yield node, ref
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


async def _resolve_conditional_refs(server: Server, tx: WriteTx | None, resource: dict[str, Any],
                                    index: int) -> None:
    """``Patient?identifier=…`` references inside a transaction resolve to the single match."""
    for node, ref in list(_conditional_refs(resource)):
        rtype, _, q = ref.partition("?")
        crud.check_type(server, rtype)
        ids = await crud.conditional_match(server, rtype, q, tx)
        if len(ids) != 1:
            raise FHIRError(412 if ids else 404,
                            f"Bundle.entry[{index}]: conditional reference {ref!r} matched {len(ids)} "
                            "resources (exactly one is required)", "not-found" if not ids else "duplicate",
                            message_id="conditional-reference")
        node["reference"] = f"{rtype}/{ids[0]}"


async def _run_entry(server: Server, ctx: RequestContext, e: _Entry, tx: WriteTx | None) -> dict[str, Any]:
    prefer = ctx.prefer.get("return", "representation")
    req = e.request
    path = e.path
    if e.method in ("GET", "HEAD"):
        if len(path) == 2:
            # In a transaction the GETs run last and see what its writes did (a PUT of the same resource).
            rec = await crud.read(server, ctx, path[0], path[1], tx=tx)
            return {"fullUrl": f"{ctx.base_url}/{rec.type}/{rec.id}", "resource": fhirjson.loads(rec.content),
                    "response": {"status": "200 OK", "etag": crud.etag(rec.version),
                                 "lastModified": crud.instant(rec.last_updated)}}
        if len(path) == 4 and path[2] == "_history":
            rec = await crud.vread(server, ctx, path[0], path[1], path[3])
            return {"resource": fhirjson.loads(rec.content),
                    "response": {"status": "200 OK", "etag": crud.etag(rec.version)}}
        if len(path) == 1 and server.search is not None:
            from dhp.interactions.search import search_type

            crud.check_type(server, path[0])
            bundle = await search_type(server, ctx, path[0], parse_qsl(e.query, keep_blank_values=True))
            return {"resource": bundle, "response": {"status": "200 OK"}}
        raise bad_request(f"Bundle.entry[{e.index}]: unsupported GET url {e.url!r}", f"Bundle.entry[{e.index}]")
    if e.method == "POST":
        if len(path) != 1:
            raise bad_request(f"Bundle.entry[{e.index}]: POST url must be a resource type", f"Bundle.entry[{e.index}]")
        assert e.resource is not None
        await _resolve_conditional_refs(server, tx, e.resource, e.index)
        res = await crud.create(server, ctx, path[0], e.resource, tx=tx, if_none_exist=req.get("ifNoneExist"),
                                rid=e.resource.get("id") if tx is not None and "_assigned" in req else None)
        if e.target is not None and res.rec is not None and f"{res.rec.type}/{res.rec.id}" != e.target:
            raise _target_moved(e)
        return _response(ctx, res, prefer)
    if e.method == "PUT":
        assert e.resource is not None
        await _resolve_conditional_refs(server, tx, e.resource, e.index)
        if len(path) == 1 and e.query:
            ids = await crud.conditional_match(server, path[0], e.query, tx)
            if len(ids) > 1:
                raise FHIRError(412, f"Bundle.entry[{e.index}]: conditional update matched {len(ids)} resources",
                                "duplicate", message_id="conditional-multiple")
            if e.target is not None:  # a transaction resolved it already; references point there
                if ids and f"{path[0]}/{ids[0]}" != e.target:
                    raise _target_moved(e)
                rid = e.target.split("/", 1)[1]
            else:
                rid = ids[0] if ids else (e.resource.get("id") or new_id())
            e.resource.setdefault("id", rid)
            path = [path[0], rid]
        if len(path) != 2:
            raise bad_request(f"Bundle.entry[{e.index}]: PUT url must be Type/id", f"Bundle.entry[{e.index}]")
        res = await crud.update(server, ctx, path[0], path[1], e.resource, tx=tx, if_match=req.get("ifMatch"))
        return _response(ctx, res, prefer)
    if e.method == "PATCH":
        if len(path) != 2:
            raise bad_request(f"Bundle.entry[{e.index}]: PATCH url must be Type/id", f"Bundle.entry[{e.index}]")
        assert e.resource is not None
        if e.resource.get("resourceType") == "Binary":
            import base64

            data = e.resource.get("data", "")
            try:
                if not isinstance(data, str):
                    raise ValueError("Binary.data is not a string")
                body = fhirjson.loads(base64.b64decode(data))
            except (ValueError, fhirjson.JSONError):
                raise bad_request(f"Bundle.entry[{e.index}]: Binary patch is not a JSON Patch") from None
            res = await crud.patch(server, ctx, path[0], path[1], body, "json-patch", tx=tx,
                                   if_match=req.get("ifMatch"))
        else:
            res = await crud.patch(server, ctx, path[0], path[1], e.resource, "fhirpath", tx=tx,
                                   if_match=req.get("ifMatch"))
        return _response(ctx, res, prefer)
    # DELETE
    if len(path) == 1 and e.query:
        ids = await crud.conditional_match(server, path[0], e.query, tx)
        if len(ids) > 1:
            raise FHIRError(412, f"Bundle.entry[{e.index}]: conditional delete matched {len(ids)} resources",
                            "duplicate", message_id="conditional-multiple")
        if not ids:
            return {"response": {"status": "204 No Content"}}
        path = [path[0], ids[0]]
    if len(path) != 2:
        raise bad_request(f"Bundle.entry[{e.index}]: DELETE url must be Type/id", f"Bundle.entry[{e.index}]")
    res = await crud.delete(server, ctx, path[0], path[1], tx=tx, if_match=req.get("ifMatch"))
    return {"response": {"status": "204 No Content" if res.status == 204 else "200 OK"}}


def _target_moved(e: _Entry) -> FHIRError:
    return FHIRError(409, f"Bundle.entry[{e.index}]: the conditional {e.method} matched {e.target} when the "
                     "transaction began, but another entry of the transaction changed what it matches",
                     "conflict", message_id="conditional-target-changed")


async def _resolve_targets(server: Server, tx: WriteTx, entries: list[_Entry], mapping: dict[str, str]) -> None:
    """Where each conditional create (``ifNoneExist``) and conditional update (``PUT Type?query``) will write,
    decided before any of them runs, so that references to their fullUrls can be rewritten to it: the match
    when there is one, else the id the entry will create. Entries with the same condition share a target
    (the first creates it, the later ones find it)."""
    decided: dict[tuple[str, str, str], str] = {}
    for e in sorted(entries, key=lambda x: (_ORDER[x.method], x.index)):
        if e.resource is None or len(e.path) != 1:
            continue
        if e.method == "POST" and isinstance(e.request.get("ifNoneExist"), str) and e.request["ifNoneExist"]:
            key = ("POST", e.path[0], e.request["ifNoneExist"])
            fresh = f"{e.path[0]}/{e.resource.get('id')}"
        elif e.method == "PUT" and e.query:
            key = ("PUT", e.path[0], e.query)
            given = e.resource.get("id")
            fresh = f"{e.path[0]}/{given if isinstance(given, str) and given else new_id()}"
        else:
            continue
        target = decided.get(key)
        if target is None:
            crud.check_type(server, e.path[0])
            try:
                ids = await crud.conditional_match(server, e.path[0], key[2], tx)
            except FHIRError as err:
                raise _with_entry(err, e.index) from None
            if len(ids) > 1:
                raise _with_entry(FHIRError(412, f"conditional {e.method} matched {len(ids)} resources",
                                            "duplicate", message_id="conditional-multiple"), e.index)
            target = decided[key] = f"{e.path[0]}/{ids[0]}" if ids else fresh
        if e.full_url:  # only a fullUrl can be referenced: the others decide at their turn, as a batch would
            e.target = target
            mapping[e.full_url] = target


def _with_entry(err: FHIRError, index: int) -> FHIRError:
    for issue in err.issues:
        issue.expression = [f"Bundle.entry[{index}]" + ("." + x if x else "") for x in (issue.expression or [""])]
        if not issue.diagnostics.startswith("Bundle.entry["):
            issue.diagnostics = f"Bundle.entry[{index}]: {issue.diagnostics}"
    return err


async def transaction(server: Server, ctx: RequestContext, bundle: dict[str, Any]) -> dict[str, Any]:
    entries = _parse_entries(bundle)
    # Assign ids to created resources and map every local fullUrl to its server URL.
    mapping: dict[str, str] = {}
    seen_full: set[str] = set()
    for e in entries:
        if e.full_url:
            if e.full_url in seen_full:
                raise bad_request(f"Bundle.entry[{e.index}]: fullUrl {e.full_url!r} appears twice",
                                  f"Bundle.entry[{e.index}].fullUrl", "duplicate-fullurl")
            seen_full.add(e.full_url)
        if e.method == "POST" and e.resource is not None and len(e.path) == 1:
            if e.resource.get("resourceType") != e.path[0]:
                raise _with_entry(bad_request(f"resourceType does not match the request url {e.url!r}"), e.index)
            fresh_id = new_id()
            e.resource["id"] = fresh_id
            e.request = {**e.request, "_assigned": True}
            if e.full_url:
                mapping[e.full_url] = f"{e.path[0]}/{fresh_id}"
        elif e.method == "PUT" and e.full_url and len(e.path) == 2:
            mapping[e.full_url] = f"{e.path[0]}/{e.path[1]}"
    targets = [(e.path[0], e.path[1]) for e in entries if e.method in ("PUT", "PATCH", "DELETE") and len(e.path) == 2]
    if len(targets) != len(set(targets)):
        raise bad_request("A transaction may not touch the same resource twice", "Bundle.entry",
                          "duplicate-target")
    ordered = sorted(entries, key=lambda e: (_ORDER[e.method], e.index))
    conditional = any((e.method == "POST" and e.request.get("ifNoneExist")) or (e.method == "PUT" and e.query)
                      for e in entries if e.resource is not None and len(e.path) == 1)
    if not conditional:
        for e in entries:
            if e.resource is not None and mapping:
                _rewrite(e.resource, mapping, server)
    originals = {e.index: copy.deepcopy(e.resource) for e in entries if conditional and e.resource is not None}
    # Taken from the entries as posted (a retry sees them rewritten); SQLite's one writer needs no such locks.
    conditions = [] if server.store.is_sqlite else list(_conditions(entries))

    async def run() -> list[tuple[int, dict[str, Any]]]:
        results: list[tuple[int, dict[str, Any]]] = []
        async with server.store.begin() as tx:
            await tx.prefetch(targets)  # one locking read for every resource the entries will change
            await tx.lock_conditions(conditions)
            resolved = not conditional
            for e in ordered:
                if not resolved and e.method != "DELETE":
                    # After the DELETEs (they change what conditions match, and carry no references), decide
                    # where conditional writes go, so references to their fullUrls can point there.
                    resolved = True
                    local = dict(mapping)
                    for x in entries:
                        x.target = None
                        if x.resource is not None:  # a retry starts again from the entries as posted
                            x.resource = copy.deepcopy(originals[x.index])
                    await _resolve_targets(server, tx, [x for x in entries if x.method != "DELETE"], local)
                    for x in entries:
                        if x.resource is not None and local:
                            _rewrite(x.resource, local, server)
                try:
                    results.append((e.index, await _run_entry(server, ctx, e, tx)))
                except FHIRError as err:
                    raise _with_entry(err, e.index) from None
        return results

    results = await retry_conflicts(run)
    results.sort(key=lambda r: r[0])
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": crud.instant(now_us())},
            "type": "transaction-response", "entry": [r for _, r in results]}


async def batch(server: Server, ctx: RequestContext, bundle: dict[str, Any]) -> dict[str, Any]:
    raw = bundle.get("entry") or []
    if not isinstance(raw, list):
        raise bad_request("Bundle.entry must be an array", "Bundle.entry")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        try:
            (e,) = _parse_entries({"entry": [item]})
            e.index = i
            out.append(await _run_entry(server, ctx, e, None))
        except FHIRError as err:
            err = _with_entry(err, i)
            out.append({"response": {"status": str(err.status), "outcome": err.outcome()}})
        except Exception as exc:
            # Earlier entries are committed: an unexpected failure of one entry must not turn the whole
            # answer into an error that hides them. It is reported on its own entry, as the API would.
            out.append({"response": _entry_failure(exc, i)})
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": crud.instant(now_us())},
            "type": "batch-response", "entry": out}


def _entry_failure(exc: Exception, index: int) -> dict[str, Any]:
    """A batch entry's response for an exception that is not a FHIRError (what FHIRApp maps for a request)."""
    if unavailable(exc):
        err = FHIRError(503, "The database is unavailable; the entry was not completed", "transient",
                        message_id="database-unavailable")
    elif unstorable_value(exc):
        err = FHIRError(400, "The entry contains a value the server cannot store or compare; nothing was changed",
                        "invalid", message_id="invalid-value")
    else:
        log.exception("unhandled error in batch entry %d", index, exc_info=exc)
        err = FHIRError(500, "Internal server error; the entry was not applied", "exception",
                        message_id="internal-error")
    err = _with_entry(err, index)
    return {"status": str(err.status), "outcome": err.outcome()}


async def process(server: Server, ctx: RequestContext, bundle: dict[str, Any]) -> dict[str, Any]:
    kind = bundle.get("type")
    if kind == "transaction":
        return await transaction(server, ctx, bundle)
    if kind == "batch":
        return await batch(server, ctx, bundle)
    raise FHIRError(400, f"POST to the base accepts Bundle.type batch or transaction, not {kind!r}", "invalid",
                    expression="Bundle.type", message_id="bundle-type")


__all__ = ["Issue", "batch", "process", "transaction"]
