"""Search interactions: type, system and compartment search, and matching for conditional operations.

Paging is keyset-based: a next/previous link carries the sort position of the page's last/first entry
(``_cursor``), so writes between two page requests neither repeat nor skip entries that were there before.
"""

from __future__ import annotations

import base64
import math
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from dhp import fhirjson
from dhp.errors import FHIRError, Issue
from dhp.search.engine import SearchEngine
from dhp.search.query import AnyOf, Include, Node, Nothing, SearchQuery, SortKey, TypeIs
from dhp.store import search as sql

#: Most resources _include/_revinclude add to one page; beyond it the page says so with a warning.
MAX_INCLUDES = 1000
#: Rounds of _include:iterate.
MAX_ITERATE = 4


def _engine(server: Any) -> SearchEngine:
    eng = server.search
    if eng is None:
        raise FHIRError(501, "Search is not available on this server", "not-supported",
                        message_id="search-unavailable")
    if eng.store is None:
        eng.store = server.store
    return eng


#: Non-finite floats (a stored 1e400 indexes as infinity) by their cursor spelling: JSON has no infinities, and
#: orjson would write them as null — which the keyset comparison reads as "no value", so the next page skipped
#: every resource with a finite value.
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_INT64 = 2 ** 63


def _cursor_value(v: Any) -> Any:
    if type(v) is float and not math.isfinite(v):
        return {"f": "nan" if v != v else ("inf" if v > 0 else "-inf")}
    return v


def _encode_cursor(key: list[Any], backward: bool) -> str:
    raw = orjson.dumps({"k": [_cursor_value(v) for v in key], "b": backward})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bad_cursor(why: str = "is not valid (use the links the server gave)") -> FHIRError:
    return FHIRError(400, f"The paging cursor {why}", "invalid", expression=["_cursor"],
                     message_id="search-bad-cursor")


def _decode_cursor(text: str) -> tuple[list[Any], bool]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        d = orjson.loads(raw)
        key, backward = d["k"], bool(d.get("b"))
        if not isinstance(key, list):
            raise ValueError
        key = [_NONFINITE[v["f"]] if isinstance(v, dict) else v for v in key]
        return key, backward
    except (ValueError, KeyError, TypeError):
        raise _bad_cursor() from None


def _check_cursor(key: list[Any], sort: list[SortKey], single: bool) -> None:
    """The cursor's values have the layout and types ``sql.page`` makes for this sort: a hand-made one with
    an object, a boolean or a number where a text goes failed in the database (a 500) instead of a 400."""
    kinds: list[str] = []
    for k in sort:
        kinds.append("flag")
        if k.table in ("_id", "string", "uri", "token", "reference"):
            kinds.append("str" if k.table == "_id" else "str?")
        elif k.table in ("_lastUpdated", "date"):
            kinds.append("int" if k.table == "_lastUpdated" else "int?")
        else:
            kinds.append("num?")
    kinds += ["str"] * (1 if single else 2)  # (type and) id
    if len(key) != len(kinds):
        raise _bad_cursor("does not fit this search")
    for v, kind in zip(key, kinds, strict=True):
        if v is None and kind.endswith("?"):
            continue
        kind = kind.rstrip("?")
        t = type(v)
        if kind == "str":
            ok = t is str and "\x00" not in v
        elif kind == "num":
            ok = (t is int and -_INT64 <= v < _INT64) or t is float
        else:  # int, flag
            ok = t is int and (-_INT64 <= v < _INT64 if kind == "int" else v in (0, 1))
        if not ok:
            raise _bad_cursor("does not fit this search")


def _split_cursor(params: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    cursor = None
    rest = []
    for k, v in params:
        if k == "_cursor":
            cursor = v
        else:
            rest.append((k, v))
    return rest, cursor


def _check_type(server: Any, rtype: str) -> None:
    if rtype not in server.registry.resource_types():
        raise FHIRError(404, f"Unknown resource type '{rtype}'", "not-supported",
                        message_id="unknown-resource-type")


async def search_type(server: Any, ctx: Any, rtype: str, params: list[tuple[str, str]]) -> dict[str, Any]:
    _check_type(server, rtype)
    return await _search(server, ctx, [rtype], params, rtype, [])


async def search_system(server: Any, ctx: Any, params: list[tuple[str, str]]) -> dict[str, Any]:
    return await _search(server, ctx, None, params, "", [])


async def search_compartment(server: Any, ctx: Any, comp_type: str, comp_id: str, rtype_or_star: str,
                             params: list[tuple[str, str]]) -> dict[str, Any]:
    eng = _engine(server)
    _check_type(server, comp_type)
    comp = eng.params.compartments.get(comp_type)
    if comp is None:
        raise FHIRError(400, f"'{comp_type}' is not a compartment type", "invalid",
                        message_id="search-compartment-unknown")
    path = f"{comp_type}/{comp_id}/{rtype_or_star}"
    if rtype_or_star != "*":
        _check_type(server, rtype_or_star)
        if rtype_or_star not in comp and rtype_or_star != comp_type:
            raise FHIRError(400, f"{rtype_or_star} is not in the {comp_type} compartment", "invalid",
                            message_id="search-compartment-type")
        node = eng.compartment_node(comp_type, comp_id, rtype_or_star)
        return await _search(server, ctx, [rtype_or_star], params, path, [node])
    types = sorted(set(comp) | {comp_type})
    outside = sorted({t.strip() for k, v in params if k == "_type" for t in v.split(",") if t.strip()}
                     - set(types))
    if outside:
        # As for Patient/x/Organization: a type outside the compartment is an error, not an empty page.
        raise FHIRError(400, f"{', '.join(outside)} not in the {comp_type} compartment", "invalid",
                        expression=["_type"], message_id="search-compartment-type")
    alts = [[TypeIs([t]), eng.compartment_node(comp_type, comp_id, t)] for t in types]
    return await _search(server, ctx, types, params, path, [AnyOf(alts)], system=True)


async def find_ids(server: Any, rtype: str, params: list[tuple[str, str]], tx: Any = None) -> list[str]:
    """Ids of live ``rtype`` resources matching ``params`` (conditional create/update/delete, references)."""
    eng = _engine(server)
    _check_type(server, rtype)
    nodes = eng.parser(base_url="").nodes(rtype, params)
    if not nodes:
        raise FHIRError(400, "A conditional match needs at least one search parameter", "invalid",
                        message_id="bad-conditional")
    is_sqlite = server.store.is_sqlite
    if tx is not None:
        return await sql.match_ids(tx.conn, is_sqlite=is_sqlite, rtype=rtype, nodes=nodes, limit=10000)
    async with server.store.read_conn() as conn:
        await sql.prepare_read(conn, is_sqlite)
        return await sql.match_ids(conn, is_sqlite=is_sqlite, rtype=rtype, nodes=nodes, limit=10000)


def _restrictions(eng: SearchEngine, ctx: Any, types: list[str] | None, system: bool) -> list[Node]:
    if getattr(ctx, "principal", None) is None:
        return []
    if not system and types:
        return eng.restrictions(ctx, types[0])
    wanted = types or sorted(eng.params.resource_types)
    alts = []
    for t in wanted:
        alts.append([TypeIs([t]), *eng.restrictions(ctx, t)])
    return [AnyOf(alts)]


async def _search(server: Any, ctx: Any, types: list[str] | None, params: list[tuple[str, str]], path: str,
                  extra: list[Node], *, system: bool | None = None) -> dict[str, Any]:
    eng = _engine(server)
    settings = server.settings
    params, cursor = _split_cursor(params)
    system = types is None if system is None else system
    parser = eng.parser(base_url=ctx.base_url, strict=ctx.strict, default_count=settings.default_count,
                        max_count=settings.max_count)
    q = parser.parse(None if types is None else (types if not system else None), params)
    if types is not None and system:
        if q.types:
            q.types = [t for t in q.types if t in types]
            if not q.types:
                q.nodes.append(Nothing())
        else:
            q.types = list(types)
    q.nodes += extra
    q.nodes += _restrictions(eng, ctx, q.types or None, system)
    search_types: list[str] | None = q.types or None
    store = server.store
    after: list[Any] | None = None
    backward = False
    if cursor:
        after, backward = _decode_cursor(cursor)
        _check_cursor(after, q.sort, search_types is not None and len(search_types) == 1)
    count_only = q.summary == "count" or q.count == 0
    issues: list[Issue] = list(q.issues) + eng.reindex_warnings(search_types, params)
    async with store.read_conn() as conn:
        await sql.prepare_read(conn, store.is_sqlite)
        total: int | None = None
        hits: list[sql.Hit] = []
        more = False
        if not count_only:
            hits, more = await sql.page(conn, is_sqlite=store.is_sqlite, types=search_types, nodes=q.nodes,
                                        sort=q.sort, count=q.count, after=after, backward=backward)
        first_page = after is None
        if count_only or q.total in ("accurate", "estimate") or (q.total is None and first_page):
            if first_page and not more and not count_only:
                total = len(hits)
            else:
                total = await sql.count_matches(conn, is_sqlite=store.is_sqlite, types=search_types,
                                                nodes=q.nodes)
        included: list[sql.Hit] = []
        if hits and q.includes:
            included = await _includes(eng, conn, store.is_sqlite, ctx, q.includes, hits, issues)
    base = ctx.base_url.rstrip("/")
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _now()},
        "type": "searchset",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = _links(base, path, q, hits, more, after, backward, count_only)
    entries: list[dict[str, Any]] = []
    for h in hits:
        entries.append(_entry(server, base, h, "match", q))
    for h in included:
        entries.append(_entry(server, base, h, "include", q))
    if issues:
        entries.append({"resource": {"resourceType": "OperationOutcome",
                                     "issue": [i.to_fhir() for i in issues]},
                        "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return bundle


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry(server: Any, base: str, h: sql.Hit, mode: str, q: SearchQuery) -> dict[str, Any]:
    res = fhirjson.loads(h.content)
    if q.summary in ("true", "text", "data") or q.elements:
        from dhp.interactions.shape import shape_resource

        res = shape_resource(server, res, q.summary if q.summary != "false" else None, q.elements)
    return {"fullUrl": f"{base}/{h.type}/{h.id}", "resource": res, "search": {"mode": mode}}


def _links(base: str, path: str, q: SearchQuery, hits: list[sql.Hit], more: bool, after: list[Any] | None,
           backward: bool, count_only: bool) -> list[dict[str, Any]]:
    url = f"{base}/{path}" if path else base
    echo = list(q.echo)
    if not any(k == "_count" for k, _ in echo):
        echo.append(("_count", str(q.count)))

    def link(extra: list[tuple[str, str]]) -> str:
        qs = urlencode(echo + extra)
        return f"{url}?{qs}" if qs else url

    self_extra = [("_cursor", _encode_cursor(after, backward))] if after is not None else []
    links = [{"relation": "self", "url": link(self_extra)}]
    if count_only or not hits:
        return links
    # Walking forward, "more" means a next page; walking backward it means a previous one.
    has_next = more if not backward else True
    has_prev = (after is not None) if not backward else more
    if has_prev:
        links.append({"relation": "previous", "url": link([("_cursor", _encode_cursor(hits[0].key, True))])})
    if has_next:
        links.append({"relation": "next", "url": link([("_cursor", _encode_cursor(hits[-1].key, False))])})
    return links


async def _includes(eng: SearchEngine, conn: Any, is_sqlite: bool, ctx: Any, includes: list[Include],
                    hits: list[sql.Hit], issues: list[Issue]) -> list[sql.Hit]:
    seen = {(h.type, h.id) for h in hits}
    out: list[sql.Hit] = []
    frontier = hits
    restrict: dict[str, list[Node]] | None = None
    if getattr(ctx, "principal", None) is not None:
        restrict = {}
    truncated = False
    too_deep = False
    for round_no in range(MAX_ITERATE + 2):
        active = [i for i in includes if round_no == 0 or i.iterate]
        if not active or not frontier:
            break
        wanted: list[tuple[str, str]] = []
        keys = [(h.type, h.id) for h in frontier]
        # The database caps each lookup; rows already in the page count against that cap, so ask for enough
        # that a full answer means more new resources than fit (then the page says it was cut short).
        limit = MAX_INCLUDES - len(out) + len(seen)
        for inc in active:
            if not inc.reverse:
                srcs = [k for k in keys if inc.source_type in ("*", k[0])]
                if not srcs:
                    continue
                codes = None if inc.code == "*" else [inc.code]
                got = await sql.include_targets(conn, srcs, codes, inc.target_type, limit)
            else:
                tgts = keys if inc.target_type is None else [k for k in keys if k[0] == inc.target_type]
                if not tgts:
                    continue
                codes = None if inc.code == "*" else [inc.code]
                got = await sql.revinclude_sources(conn, inc.source_type, codes, tgts, limit)
            for k in got:
                if k not in seen:
                    seen.add(k)
                    wanted.append(k)
        if round_no > MAX_ITERATE:
            # One round past the depth limit only looks: if the chain goes on, the page says it was cut.
            too_deep = bool(wanted)
            break
        if len(out) + len(wanted) > MAX_INCLUDES:
            wanted = wanted[:MAX_INCLUDES - len(out)]
            truncated = True
        if restrict is not None:
            for t in {k[0] for k in wanted}:
                if t not in restrict:
                    restrict[t] = eng.restrictions(ctx, t)
        fetched = await sql.fetch(conn, is_sqlite=is_sqlite, keys=wanted, restrict=restrict)
        out += fetched
        frontier = fetched
        if truncated:
            break
    if truncated:
        issues.append(Issue("warning", "too-costly",
                            f"More than {MAX_INCLUDES} resources to include: the list is cut short; ask for a "
                            "smaller _count", sorted({"_revinclude" if i.reverse else "_include" for i in includes}),
                            "search-includes-truncated"))
    elif too_deep:
        issues.append(Issue("warning", "too-costly",
                            f"_include:iterate / _revinclude:iterate followed references {MAX_ITERATE} levels "
                            "deep and stopped there: resources further along are not included",
                            sorted({("_revinclude" if i.reverse else "_include") + ":iterate"
                                    for i in includes if i.iterate}), "search-includes-too-deep"))
    return out
