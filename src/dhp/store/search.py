"""Search index tables and every SQL statement search needs (SQLAlchemy Core: SQLite and PostgreSQL).

One table per value kind, each row keyed by (resource type, id, parameter code). Rows of a resource are
replaced (or, on an update, changed row by row) inside the write transaction that changes it, so a search right
after a write sees it.

The planner in ``dhp.search`` hands over a :class:`dhp.search.query.SearchQuery`'s nodes; here they become
``id IN (SELECT id FROM search_x WHERE …)`` semi-joins, which both backends drive from the index side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    not_,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ColumnElement, Select

from dhp.instants import MAX_US, MIN_US
from dhp.search.extract import EXACT_LEN, KEY_LEN, STR_LEN
from dhp.search.query import (
    ANY,
    AnyOf,
    Chain,
    Clause,
    Compartment,
    CompositeMatch,
    Has,
    IdClause,
    LastUpdated,
    ListClause,
    NearMatch,
    Node,
    Nothing,
    RangeMatch,
    RefMatch,
    RowCode,
    SortKey,
    StringMatch,
    TokenMatch,
    TypeIs,
    UriMatch,
)
from dhp.store import SQ_EXEC, SQ_MANY, SQ_ROWS
from dhp.store.schema import history, metadata, resources

__all__ = [
    "COLUMNS", "FLOAT_KINDS", "TABLES", "SearchRow", "count_matches", "fetch", "include_targets",
    "page", "revinclude_sources",
]


def _key(name: str, length: int = 512) -> Column[Any]:
    return Column(name, String(length), nullable=True)


def _table(kind: str, *cols: Column[Any], indexes: Sequence[Sequence[str]] = (),
           partial: Sequence[int] = ()) -> Table:
    """``partial``: positions in ``indexes`` whose last column is indexed only where it is not NULL."""
    name = f"search_{kind}"
    idx = []
    for i, ix in enumerate(indexes):
        kw = {}
        if i in partial:
            where = text(f"{ix[-1]} IS NOT NULL")
            kw = {"postgresql_where": where, "sqlite_where": where}
        idx.append(Index(f"ix_{name}_{i}", *ix, **kw))
    return Table(
        name, metadata,
        Column("type", String(64), nullable=False),
        Column("id", String(64), nullable=False),
        Column("code", String(100), nullable=False),
        *cols,
        Index(f"ix_{name}_res", "type", "id"),
        *idx,
    )


string_t = _table("string", _key("value", 255), _key("exact", 1000),
                  indexes=[("type", "code", "value", "id")])
token_t = _table("token", _key("system"), _key("value"), _key("text", 255), _key("tsystem"), _key("tcode"),
                 indexes=[("type", "code", "value", "system", "id")])
reference_t = _table("reference", _key("target_type", 64), _key("target_id", 64), _key("url"),
                     _key("version"), _key("isystem"), _key("ivalue"),
                     indexes=[("type", "code", "target_type", "target_id", "id"), ("target_type", "target_id"),
                              ("type", "code", "url"), ("type", "code", "ivalue")], partial=(2, 3))
date_t = _table("date", Column("low", BigInteger, nullable=False), Column("high", BigInteger, nullable=False),
                indexes=[("type", "code", "low", "high", "id"), ("type", "code", "high", "id")])
number_t = _table("number", Column("low", Float, nullable=False), Column("high", Float, nullable=False),
                  indexes=[("type", "code", "low", "id")])
quantity_t = _table("quantity", Column("low", Float, nullable=False), Column("high", Float, nullable=False),
                    _key("system"), _key("unit_code"), _key("unit"),
                    indexes=[("type", "code", "low", "id")])
uri_t = _table("uri", _key("value"), indexes=[("type", "code", "value", "id")])
composite_t = _table("composite", *[c for i in (1, 2, 3) for c in (
    _key(f"s{i}"), _key(f"v{i}"), Column(f"lo{i}", Float), Column(f"hi{i}", Float))],
    indexes=[("type", "code", "v1", "v2")])
near_t = _table("near", Column("lat", Float, nullable=False), Column("lon", Float, nullable=False),
                indexes=[("type", "code", "lat", "lon")])

TABLES: dict[str, Table] = {"string": string_t, "token": token_t, "reference": reference_t, "date": date_t,
                            "number": number_t, "quantity": quantity_t, "uri": uri_t, "composite": composite_t,
                            "near": near_t}
#: Value columns of each table, in the order the extractors produce them.
COLUMNS: dict[str, tuple[str, ...]] = {k: tuple(c.name for c in t.columns)[3:] for k, t in TABLES.items()}

SearchRow = tuple[str, str, str, tuple[Any, ...]]  # (table kind, type, id, code + values)

#: Reindex jobs a SearchParameter change started. A job's row is written in the transaction that changes the
#: parameter and stays open until every resource of its types has been reindexed: every process reads the open
#: ones (searches on their parameters say that matches may be missing), and a job whose process stopped
#: beating is taken over by another.
reindex_jobs = Table(
    "search_reindex", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("types", Text, nullable=False),  # JSON list of resource types ("Resource": all)
    Column("codes", Text, nullable=True),  # JSON list of parameter codes; NULL: all of the types' parameters
    Column("owner", String(64), nullable=False),  # the process running it (SearchEngine.owner)
    Column("heartbeat", BigInteger, nullable=False),  # µs since the epoch, renewed with every chunk
    Column("done", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("finished", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
)


@dataclass
class ReindexRow:
    """An open reindex job as the table has it."""

    id: int
    types: list[str]
    codes: list[str] | None
    owner: str
    heartbeat: int
    done: int
    total: int


async def open_reindex_job(conn: Any, job_id: int, types: Sequence[str], codes: Sequence[str] | None,
                           owner: str) -> None:
    """Record an open job (inside the transaction that makes it necessary)."""
    await conn.execute(insert(reindex_jobs).values(
        id=job_id, types=orjson.dumps(sorted(types)).decode(),
        codes=None if codes is None else orjson.dumps(sorted(codes)).decode(), owner=owner,
        heartbeat=time.time_ns() // 1000, done=0, total=0))


async def open_reindex_jobs(conn: AsyncConnection) -> list[ReindexRow]:
    j = reindex_jobs
    q = (select(j.c.id, j.c.types, j.c.codes, j.c.owner, j.c.heartbeat, j.c.done, j.c.total)
         .where(j.c.finished.is_(None)).order_by(j.c.id))
    return [ReindexRow(r[0], orjson.loads(r[1]), None if r[2] is None else orjson.loads(r[2]), r[3], r[4], r[5],
                       r[6]) for r in (await conn.execute(q)).all()]


async def beat_reindex_jobs(conn: Any, ids: Sequence[int], owner: str, done: int, total: int,
                            types: Sequence[str] | None = None, codes: Sequence[str] | None = None) -> int:
    """Renew the heartbeat (and progress) of ``owner``'s open jobs ``ids``; ``types``/``codes``: what the jobs
    turned out to cover. How many rows are still ``owner``'s (0: another process took them over)."""
    j = reindex_jobs
    values: dict[str, Any] = {"heartbeat": time.time_ns() // 1000, "done": done, "total": total}
    if types is not None:
        values["types"] = orjson.dumps(sorted(types)).decode()
        values["codes"] = None if codes is None else orjson.dumps(sorted(codes)).decode()
    r = await conn.execute(update(j).where(j.c.id.in_(list(ids)), j.c.owner == owner, j.c.finished.is_(None))
                           .values(**values))
    return int(r.rowcount or 0)


async def claim_reindex_job(conn: Any, job_id: int, seen_heartbeat: int, owner: str) -> bool:
    """Take over an open job whose heartbeat is still the stale one seen: one process wins."""
    j = reindex_jobs
    r = await conn.execute(update(j).where(j.c.id == job_id, j.c.heartbeat == seen_heartbeat,
                                           j.c.finished.is_(None))
                           .values(owner=owner, heartbeat=time.time_ns() // 1000))
    return bool(r.rowcount)


async def finish_reindex_jobs(conn: Any, ids: Sequence[int], owner: str, error: str | None = None) -> None:
    j = reindex_jobs
    await conn.execute(update(j).where(j.c.id.in_(list(ids)), j.c.owner == owner, j.c.finished.is_(None))
                       .values(finished=time.time_ns() // 1000, heartbeat=time.time_ns() // 1000,
                               error=error))


# ------------------------------------------------------------------ writing

async def delete_many(conn: AsyncConnection, keys: Sequence[tuple[str, str]], kinds: Iterable[str] | None = None,
                      ) -> None:
    for k in (kinds if kinds is not None else TABLES):
        t = TABLES[k]
        for i in range(0, len(keys), 500):
            await conn.execute(delete(t).where(tuple_(t.c.type, t.c.id).in_(list(keys[i:i + 500]))))


_compiled: dict[tuple[str, Any], tuple[str, tuple[str, ...]]] = {}


def _compile(conn: AsyncConnection, key: Any, build: Any) -> tuple[str, tuple[str, ...]]:
    """SQL text (and positional parameter names) of a Core statement, compiled once per dialect.

    The write hooks run on every create: building and cache-keying a Core statement each time costs more
    than executing it, so they execute the compiled text directly.
    """
    dialect = conn.sync_connection.dialect  # type: ignore[union-attr]
    k = (dialect.name, key)
    got = _compiled.get(k)
    if got is None:
        c = build().compile(dialect=dialect)
        got = (str(c), tuple(c.positiontup or ()))
        _compiled[k] = got
    return got


def _delete_row_stmt(kind: str) -> Any:
    """Delete one index row by all its columns (NULLs equal: ``IS``), parameters in the order of a row."""
    t = TABLES[kind]
    cond = [t.c.type == bindparam("type"), t.c.id == bindparam("id"), t.c.code == bindparam("code")]
    cond += [t.c[n].is_(bindparam(n)) if t.c[n].nullable else t.c[n] == bindparam(n) for n in COLUMNS[kind]]
    return delete(t).where(*cond)


def _insert_stmt(kind: str) -> Any:
    t = TABLES[kind]
    names = ("type", "id", "code", *COLUMNS[kind])
    return insert(t).values({n: bindparam(n) for n in names})


def sqlite_index_writes(conn: Any, rtype: str, rid: str, rows: dict[str, list[tuple[Any, ...]]],
                        kinds: Iterable[str], *, fresh: bool,
                        removed: dict[str, list[tuple[Any, ...]]] | None = None) -> list[tuple[str, Any, int]]:
    """The SQLite statements changing one resource's index rows, as (SQL, parameters, SQ_* mode) for the
    write transaction's buffer (``WriteTx``): all its rows in ``kinds`` go (unless ``fresh``: it has none
    yet, a create), then the single rows in ``removed``, then ``rows`` are added. With ``rtype`` empty, rows
    of many resources are only added.

    PostgreSQL queues the same rows in the transaction and sends them with its other writes as one statement
    (:func:`flush_statement`).
    """
    out: list[tuple[str, Any, int]] = []
    for k in (tuple(kinds) if not fresh else ()):
        sql_text, _ = _compile(conn, ("del", k), lambda k=k: delete(TABLES[k]).where(
            TABLES[k].c.type == bindparam("type"), TABLES[k].c.id == bindparam("id")))
        out.append((sql_text, (rtype, rid), SQ_EXEC))
    for k, lst in (removed or {}).items():
        if lst:
            sql_text, _ = _compile(conn, ("del1", k), lambda k=k: _delete_row_stmt(k))
            out.append((sql_text, lst, SQ_MANY))
    for k, lst in rows.items():
        if lst:
            sql_text, _ = _compile(conn, ("ins", k), lambda k=k: _insert_stmt(k))
            out.append((sql_text, lst, SQ_ROWS))
    return out


async def lock_current(conn: AsyncConnection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """Current rows of ``keys`` (PostgreSQL), locked FOR UPDATE in key order (a fixed order: two transactions
    locking overlapping sets cannot deadlock on them)."""
    from dhp.store import StoredResource

    ordered = sorted(set(keys))
    rows = (await conn.exec_driver_sql(
        "SELECT r.type, r.id, r.version, r.last_updated, r.deleted, r.content, r.index_key FROM resources r "
        "JOIN jsonb_array_elements($1::text::jsonb) AS k ON r.type = k->>0 AND r.id = k->>1 "
        "ORDER BY r.type, r.id FOR UPDATE OF r",
        (orjson.dumps(ordered).decode(),))).all()
    return {(r[0], r[1]): StoredResource(*r) for r in rows}


_flush_sql: dict[Any, str] = {}


@cache
def _pg_dialect() -> Any:
    from sqlalchemy.dialects import postgresql

    return postgresql.dialect()


def _pg_type(col: Column[Any]) -> str:
    """A column's PostgreSQL type name; one dialect object for all (each new one is a garbage cycle)."""
    return str(col.type.compile(dialect=_pg_dialect()))


def flush_statement(p: Any) -> tuple[str, tuple[Any, ...]]:
    """The one PostgreSQL statement that applies a transaction's queued writes (``dhp.store._Pending``).

    Data-modifying CTEs share one snapshot: the DELETEs see only the rows that were there before, so old index
    rows go and new ones stay. Rows travel as JSON arrays, so the SQL text stays the same whatever the row
    counts, and each shape of statement is prepared once per connection.
    """
    del_kinds = tuple(sorted(k for k, v in p.index_deletes.items() if v))
    rm_kinds = tuple(sorted(k for k, v in p.index_removed.items() if v))
    ins_kinds = tuple(sorted(k for k, v in p.index_rows.items() if v))
    shape = (bool(p.inserts), bool(p.updates), bool(p.history), del_kinds, rm_kinds, ins_kinds)
    params: list[Any] = []
    # The resources' and history's rows travel as JSON, like index rows, their contents once each in one
    # bytea array that the rows name by position: asyncpg encodes a list parameter element by element with
    # isinstance checks against abstract base classes, and sixteen one-element arrays cost a create ~8 % of
    # its client instructions.
    if p.inserts or p.updates or p.history:
        contents: list[bytes] = []
        at: dict[int, int] = {}

        def slot(content: bytes) -> int:
            i = at.get(id(content))
            if i is None or contents[i - 1] is not content:
                contents.append(content)
                i = at[id(content)] = len(contents)  # PostgreSQL arrays count from 1
            return i

        params.append(contents)
        if p.inserts:
            params.append(orjson.dumps([(*r[:7], slot(r[7]), r[8]) for r in p.inserts]).decode())
        if p.updates:
            params.append(orjson.dumps([(*r[:7], slot(r[7]), *r[8:]) for r in p.updates]).decode())
        if p.history:
            params.append(orjson.dumps([(*r[:6], slot(r[6])) for r in p.history]).decode())
    for k in del_kinds:
        params.append(orjson.dumps(p.index_deletes[k]).decode())
    for k in rm_kinds:
        params.append(_json_rows(k, p.index_removed[k]))
    for k in ins_kinds:
        params.append(_json_rows(k, p.index_rows[k]))
    if p.updates:
        params.append(len(p.updates))
    sql_text = _flush_sql.get(shape)
    if sql_text is None:
        n = 0
        ctes: list[str] = []

        def from_json(cols: Sequence[Column[Any]]) -> str:
            """SELECT of ``cols`` from the next parameter's JSON rows; ``content`` is a position in $1."""
            nonlocal n
            n += 1
            picks = [f"($1::bytea[])[(e->>{i})::int]" if c.name == "content" else f"(e->>{i})::{_pg_type(c)}"
                     for i, c in enumerate(cols)]
            return f"SELECT {', '.join(picks)} FROM jsonb_array_elements(${n}::text::jsonb) AS e"

        if p.inserts or p.updates or p.history:
            n = 1
        rcols = [resources.c[c] for c in ("type", "id", "version", "last_updated", "deleted", "patient",
                                          "package", "content", "index_key")]
        names = ", ".join(c.name for c in rcols)
        if p.inserts:
            ctes.append(f"ri AS (INSERT INTO resources ({names}) {from_json(rcols)} RETURNING 1)")
        if p.updates:
            # A row read for this write (u.checked) must still carry the index key it was read with: a reindex
            # batch marks the rows it rewrites. This statement's snapshot may predate that batch's commit (it
            # waited for the row lock), so its index deletes would miss the batch's rows; it refuses itself
            # instead (below) and is retried with the lock.
            sets = ", ".join(f"{c.name} = u.{c.name}" for c in rcols[2:])
            extra = [Column("prev_key", BigInteger), Column("checked", Boolean)]
            ctes.append(f"ru AS (UPDATE resources r SET {sets} FROM ({from_json([*rcols, *extra])}) "
                        f"AS u({names}, prev_key, checked) WHERE r.type = u.type AND r.id = u.id "
                        "AND (NOT u.checked OR r.index_key IS NOT DISTINCT FROM u.prev_key) RETURNING 1)")
        if p.history:
            hcols = [history.c[c] for c in ("type", "id", "version", "last_updated", "deleted", "method",
                                            "content")]
            ctes.append(f"h AS (INSERT INTO history ({', '.join(c.name for c in hcols)}) {from_json(hcols)})")
        for k in del_kinds:
            t = TABLES[k]
            n += 1
            ctes.append(f"d_{k} AS (DELETE FROM {t.name} s USING jsonb_array_elements(${n}::text::jsonb) AS k "
                        "WHERE s.type = k->>0 AND s.id = k->>1)")
        for k in rm_kinds:
            # Single rows, matched on every column (NULLs equal); they travel as JSON like inserted rows.
            t = TABLES[k]
            n += 1
            conds = ["s.type = e->>0", "s.id = e->>1", "s.code = e->>2"]
            for i, name in enumerate(COLUMNS[k], start=3):
                c = t.c[name]
                op = "IS NOT DISTINCT FROM" if c.nullable else "="
                conds.append(f"s.{name} {op} (e->>{i})::{_pg_type(c)}")
            ctes.append(f"r_{k} AS (DELETE FROM {t.name} s USING jsonb_array_elements(${n}::text::jsonb) AS e "
                        f"WHERE {' AND '.join(conds)})")
        for k in ins_kinds:
            # Index rows travel as one JSON array of arrays per table: asyncpg encodes a Python list per
            # column element by element (with ABC isinstance checks on each), which cost more client CPU
            # than the rest of the create; orjson writes the same rows in one C call.
            t = TABLES[k]
            cols = [t.c[c] for c in ("type", "id", "code", *COLUMNS[k])]
            n += 1
            picks = ", ".join(f"(e->>{i})::{_pg_type(c)}" for i, c in enumerate(cols))
            ctes.append(f"i_{k} AS (INSERT INTO {t.name} ({', '.join(c.name for c in cols)}) "
                        f"SELECT {picks} FROM jsonb_array_elements(${n}::text::jsonb) AS e)")
        # The main query reads the resources rows' CTEs, so they run first and every writer takes the
        # resource's row (or key) lock before its history and index rows: unreferenced CTEs run afterwards,
        # so two writers of one resource queue on that lock instead of deadlocking on history's unique key.
        first = ["(SELECT count(*) FROM ri)"] if p.inserts else []
        if p.updates:
            # Fewer rows updated than sent: division by zero (SQLSTATE 22012, dhp.store.ROWS_REWRITTEN) undoes
            # the whole statement. Not a constant expression, so the planner cannot fold it.
            n += 1
            first.append(f"1 / ((SELECT count(*) FROM ru) = ${n}::bigint)::int")
        sql_text = "WITH " + ",\n".join(ctes) + "\nSELECT " + (" + ".join(first) or "1")
        _flush_sql[shape] = sql_text
    return sql_text, tuple(params)


#: Index tables with float columns (the others hold text and integers: dates are integer µs).
FLOAT_KINDS = frozenset(k for k, t in TABLES.items() if any(isinstance(c.type, Float) for c in t.columns))


#: Where the float columns that never hold NULL are in a row of these kinds (the others: every value looked at).
_FLOAT_PAIRS = {"number": (3, 4), "quantity": (3, 4), "near": (3, 4)}


def _all_finite(rows: list[tuple[Any, ...]], a: int, b: int) -> bool:
    """Whether no row holds an infinity or NaN at ``a`` or ``b``: their sum over all rows is finite (both
    propagate; a sum that overflows only sends the rows down the careful path)."""
    try:
        return math.isfinite(sum(map(itemgetter(a), rows)) + sum(map(itemgetter(b), rows)))
    except TypeError:  # not numbers after all: let the careful path look
        return False


def _json_rows(kind: str, rows: list[tuple[Any, ...]]) -> str:
    """Rows as a JSON array of arrays. JSON has no infinities (orjson writes them as null), so a float
    column's non-finite values go as the strings PostgreSQL's float8 input reads."""
    if kind in FLOAT_KINDS:
        pair = _FLOAT_PAIRS.get(kind)
        if pair is None or not _all_finite(rows, *pair):
            rows = [tuple(_float_text(v) for v in r) if any(type(v) is float and not math.isfinite(v) for v in r)
                    else r for r in rows]
    text = orjson.dumps(rows).decode()
    if "\\u0000" in text:
        # PostgreSQL text cannot hold U+0000 (FHIR strings should not carry it): the index drops it; the
        # resource keeps its bytes. Searches naming it are refused (dhp.search.parse.refuse_nul).
        text = orjson.dumps([tuple(v.replace("\x00", "") if type(v) is str else v for v in r)
                             for r in rows]).decode()
    return text


def _float_text(v: Any) -> Any:
    if type(v) is not float or math.isfinite(v):
        return v
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


async def delete_code_for(conn: AsyncConnection, kind: str, rtype: str, code: str, ids: Sequence[str]) -> None:
    """Drop one parameter's rows of some resources (reindexing a single parameter)."""
    t = TABLES[kind]
    for i in range(0, len(ids), 500):
        await conn.execute(delete(t).where(t.c.type == rtype, t.c.code == code, t.c.id.in_(list(ids[i:i + 500]))))


async def scan_resources(conn: AsyncConnection, rtype: str, after_id: str, limit: int) -> list[tuple[str, bytes]]:
    """Live resources of a type in id order, for reindexing in batches. Locked until the batch's rows are
    written (PostgreSQL; SQLite's writer is alone anyway): an update committed in between would otherwise
    have its new rows replaced by rows of the version read here — and updates only change the rows that
    differ, so such rows would outlive it."""
    r = resources
    q = (select(r.c.id, r.c.content).where(r.c.type == rtype, r.c.deleted == false(), r.c.id > after_id)
         .order_by(r.c.id).limit(limit).with_for_update())
    return [(row[0], row[1]) for row in (await conn.execute(q)).all()]


async def mark_rewritten(conn: AsyncConnection, rtype: str, ids: Sequence[str]) -> None:
    """Give resources whose index rows a reindex just rewrote a fresh index key (random, negative: no extraction
    has it). A write that read one of them before fails instead of changing rows it never saw (see
    :func:`flush_statement`); the next update replaces all its rows and stores the real key."""
    import secrets

    r = resources
    await conn.execute(update(r).where(r.c.type == rtype, r.c.id.in_(list(ids)))
                       .values(index_key=-1 - secrets.randbits(62)))


async def count_type(conn: AsyncConnection, rtype: str) -> int:
    r = resources
    q = select(func.count()).select_from(r).where(r.c.type == rtype, r.c.deleted == false())
    return int((await conn.execute(q)).scalar_one())


async def types_present(conn: AsyncConnection) -> list[str]:
    r = resources
    return [row[0] for row in (await conn.execute(select(r.c.type).distinct()))]


# ------------------------------------------------------------------ query compilation

def _code(t: Any, code: str) -> ColumnElement[bool]:
    """Rows of parameter ``code`` in index table ``t``: its own, or its sources' (:class:`RowCode`)."""
    if not isinstance(code, RowCode):
        return t.c.code == code
    if code.by_type is None:
        return _sources(t, code.sources)
    alts = [and_(t.c.type == ty, _sources(t, srcs)) for ty, srcs in code.by_type.items()]
    alts.append(and_(t.c.type.not_in(list(code.by_type)), t.c.code == str(code)))
    return or_(*alts)


def _codes(t: Any, codes: Sequence[str]) -> ColumnElement[bool]:
    plain = [str(c) for c in codes if not isinstance(c, RowCode)]
    alts = [_code(t, c) for c in codes if isinstance(c, RowCode)]
    if plain:
        alts.insert(0, t.c.code == plain[0] if len(plain) == 1 else t.c.code.in_(plain))
    return or_(*alts) if len(alts) != 1 else alts[0]


def _sources(t: Any, srcs: Sequence[tuple[str, str | None]]) -> ColumnElement[bool]:
    plain = [c for c, tt in srcs if tt is None]
    alts: list[ColumnElement[bool]] = []
    if plain:
        alts.append(t.c.code == plain[0] if len(plain) == 1 else t.c.code.in_(plain))
    alts += [and_(t.c.code == c, t.c.target_type == tt) for c, tt in srcs if tt is not None]
    if not alts:
        return false()
    return alts[0] if len(alts) == 1 else or_(*alts)


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _cut(s: str | None) -> str | None:
    """A search value as the index keeps it: codes, systems, identifiers and URIs up to KEY_LEN characters."""
    return s[:KEY_LEN] if s is not None else None


class Compiler:
    """Turns search nodes into SQL conditions on a (type, id) pair of columns."""

    def __init__(self, is_sqlite: bool) -> None:
        self.is_sqlite = is_sqlite
        self.now_us = int(time.time() * 1_000_000)

    # -- entry points

    def where(self, nodes: Sequence[Node], rtype: str | None, tcol: Any, icol: Any) -> list[ColumnElement[bool]]:
        return [self.node(n, rtype, tcol, icol) for n in nodes]

    def ids(self, rtype: str, nodes: Sequence[Node]) -> Select[Any]:
        """SELECT id of live ``rtype`` resources matching every node (used for chains and _has)."""
        for i, n in enumerate(nodes):
            if isinstance(n, Clause) and not n.negate and n.missing is None:
                # Index rows exist only for live resources (a delete removes them): a positive condition
                # can be the driving table, with no probe into the resources table per candidate.
                t = TABLES[n.table].alias()
                groups = [or_(*[self._match(n.table, t, m) for m in g]) for g in [n.matches, *n.also]]
                rest = [*nodes[:i], *nodes[i + 1:]]
                return select(t.c.id).where(t.c.type == rtype, _code(t, n.code), *groups,
                                            *self.where(rest, rtype, t.c.type, t.c.id))
        r = resources.alias()
        conds = self.where(nodes, rtype, r.c.type, r.c.id)
        return select(r.c.id).where(r.c.type == rtype, r.c.deleted == false(), *conds)

    # -- nodes

    def node(self, n: Node, rtype: str | None, tcol: Any, icol: Any) -> ColumnElement[bool]:
        if isinstance(n, Clause):
            return self._clause(n, rtype, tcol, icol)
        if isinstance(n, IdClause):
            if n.missing is not None:
                return false() if n.missing else true()
            cond = icol.in_(n.ids)
            return not_(cond) if n.negate else cond
        if isinstance(n, LastUpdated):
            r = resources.alias()
            col = r.c.last_updated
            sub = select(r.c.id).where(or_(*[self._date(m, col, col) for m in n.matches]))
            return self._member(sub, r, rtype, tcol, icol)
        if isinstance(n, Chain):
            return self._chain(n, rtype, tcol, icol)
        if isinstance(n, Has):
            t = reference_t
            src = self.ids(n.src_type, n.nodes)
            sub = select(t.c.target_id).where(t.c.type == n.src_type, _code(t, n.ref_code),
                                              t.c.id.in_(src))
            if rtype is not None:
                return icol.in_(sub.where(t.c.target_type == rtype))
            return tuple_(tcol, icol).in_(select(t.c.target_type, t.c.target_id).where(
                t.c.type == n.src_type, _code(t, n.ref_code), t.c.id.in_(src)))
        if isinstance(n, ListClause):
            t = reference_t
            sub = select(t.c.target_type, t.c.target_id).where(
                t.c.type == "List", t.c.code == "item", t.c.id.in_(n.list_ids))
            if rtype is not None:
                return icol.in_(select(t.c.target_id).where(
                    t.c.type == "List", t.c.code == "item", t.c.id.in_(n.list_ids), t.c.target_type == rtype))
            return tuple_(tcol, icol).in_(sub)
        if isinstance(n, Compartment):
            return self._compartment(n, rtype, tcol, icol)
        if isinstance(n, AnyOf):
            alts = [and_(true(), *self.where(a, rtype, tcol, icol)) for a in n.alternatives]
            return or_(*alts) if alts else false()
        if isinstance(n, Nothing):
            return false()
        if isinstance(n, TypeIs):
            if rtype is not None:
                return true() if rtype in n.types else false()
            return tcol.in_(n.types)
        raise TypeError(f"unknown search node {n!r}")

    def _member(self, sub: Select[Any], t: Any, rtype: str | None, tcol: Any, icol: Any) -> ColumnElement[bool]:
        """``(type, id) IN sub`` where ``sub`` selects ``t.c.id``; typed searches pin the type inside."""
        if rtype is not None:
            return icol.in_(sub.where(t.c.type == rtype))
        return tuple_(tcol, icol).in_(sub.with_only_columns(t.c.type, t.c.id))

    def _clause(self, c: Clause, rtype: str | None, tcol: Any, icol: Any) -> ColumnElement[bool]:
        t = TABLES[c.table].alias()
        base = select(t.c.id).where(_code(t, c.code))
        if c.missing is not None:
            m = self._member(base, t, rtype, tcol, icol)
            return not_(m) if c.missing else m
        conds = [self._match(c.table, t, m) for m in c.matches]
        groups = [or_(*conds)] + [or_(*[self._match(c.table, t, m) for m in g]) for g in c.also]
        m = self._member(base.where(*groups), t, rtype, tcol, icol)
        return not_(m) if c.negate else m

    def _chain(self, n: Chain, rtype: str | None, tcol: Any, icol: Any) -> ColumnElement[bool]:
        alts = []
        for ttype, nodes in n.subs.items():
            t = reference_t.alias()
            sub = select(t.c.id).where(_code(t, n.code), t.c.target_type == ttype,
                                       t.c.target_id.in_(self.ids(ttype, nodes)))
            alts.append(self._member(sub, t, rtype, tcol, icol))
        return or_(*alts) if alts else false()

    def _compartment(self, n: Compartment, rtype: str | None, tcol: Any, icol: Any) -> ColumnElement[bool]:
        t = reference_t.alias()
        alts: list[ColumnElement[bool]] = []
        if n.codes:
            sub = select(t.c.id).where(_codes(t, n.codes), t.c.target_type == n.comp_type,
                                       t.c.target_id == n.comp_id)
            alts.append(self._member(sub, t, rtype, tcol, icol))
        if n.self_type:
            alts.append(and_(tcol == n.comp_type, icol == n.comp_id))
        return or_(*alts) if alts else false()

    # -- value matches

    def _match(self, kind: str, t: Any, m: Any) -> ColumnElement[bool]:
        if kind == "string":
            return self._string(t.c.value, t.c.exact, m)
        if kind == "token":
            return self._token(t, m)
        if kind == "reference":
            return self._ref(t, m)
        if kind == "date":
            return self._date(m, t.c.low, t.c.high)
        if kind == "number":
            return self._number(m, t.c.low, t.c.high)
        if kind == "quantity":
            return self._quantity(t, m)
        if kind == "uri":
            return self._uri(t.c.value, m)
        if kind == "near":
            return self._near(t, m)
        if kind == "composite":
            return self._composite(t, m)
        raise TypeError(kind)

    def _prefix(self, col: Any, text: str) -> ColumnElement[bool]:
        if self.is_sqlite:
            # SQLite compares UTF-8 bytes: a range is exact and uses the index (LIKE would not).
            return and_(col >= text, col < text + "\U0010ffff")
        return col.like(_like_escape(text) + "%", escape="\\")

    def _string(self, col: Any, exact: Any, m: StringMatch) -> ColumnElement[bool]:
        # Values are indexed up to STR_LEN (normalised) / EXACT_LEN characters: a longer search value is
        # compared on what the index keeps, else it could never match.
        if m.mode == "exact":
            return exact == m.text[:EXACT_LEN]
        if m.mode == "contains":
            return col.like("%" + _like_escape(m.text[:STR_LEN]) + "%", escape="\\")
        return self._prefix(col, m.text[:STR_LEN])

    def _token(self, t: Any, m: TokenMatch) -> ColumnElement[bool]:
        if m.mode == "text":
            return or_(self._prefix(t.c.text, m.code or ""),
                       t.c.text.like("% " + _like_escape(m.code or "") + "%", escape="\\"))
        if m.mode == "code-text":
            return func.lower(t.c.value).like(_like_escape((m.code or "").lower()) + "%", escape="\\")
        if m.mode == "of-type":
            return and_(t.c.tsystem == _cut(m.type_system), t.c.tcode == _cut(m.type_code),
                        t.c.value == _cut(m.code))
        if m.mode == "set":
            by_sys: dict[str | None, list[str]] = {}
            for s, c in m.codes:
                by_sys.setdefault(_cut(s), []).append(c[:KEY_LEN])
            # A bare ``code`` element (Patient.gender) is indexed without a system: its binding gives it one.
            alts = [and_(t.c.system.is_(None) if s is None else or_(t.c.system == s, t.c.system.is_(None)),
                         t.c.value.in_(sorted(cs)))
                    for s, cs in by_sys.items()]
            return or_(*alts) if alts else false()
        conds = []
        if m.code is not None:
            conds.append(t.c.value == m.code[:KEY_LEN])
        if m.system is None:
            conds.append(t.c.system.is_(None))
        elif m.system != ANY:
            conds.append(t.c.system == m.system[:KEY_LEN])
        return and_(true(), *conds)

    def _ref(self, t: Any, m: RefMatch) -> ColumnElement[bool]:
        if m.mode == "identifier":
            conds = [t.c.ivalue == _cut(m.ident_value)]
            if m.ident_system is not None:
                conds.append(t.c.isystem == _cut(m.ident_system))
            return and_(*conds)
        if m.mode in ("above", "below"):
            return self._uri(t.c.url, UriMatch(m.mode, m.url or ""))
        alts = []
        if m.target_id is not None:
            c = t.c.target_id == m.target_id
            if m.target_type is not None:
                c = and_(t.c.target_type == m.target_type, c)
            alts.append(c)
        if m.url is not None:
            c = t.c.url == m.url[:KEY_LEN]
            if m.version:
                c = and_(c, t.c.version == m.version)
            alts.append(c)
        return or_(*alts) if alts else false()

    def _date(self, m: RangeMatch, low: Any, high: Any) -> ColumnElement[bool]:
        lo, hi = int(m.lo), int(m.hi)
        p = m.prefix
        # Each form leads with a bound on one column so an index range scan can serve it; the rest is the
        # spec's definition, rewritten equivalently (low <= high always holds).
        if p == "eq":
            return and_(low >= lo, low <= hi, high <= hi)
        if p == "ne":
            return or_(low < lo, high > hi)
        w = m.width
        if p == "gt":
            # With a bounded width, "high > x" also means "low > x - width": a range on the low column.
            return and_(low > hi - w, high > hi) if w else high > hi
        if p == "lt":
            return low < lo
        if p == "ge":  # above the search range, or inside it
            cond = and_(high >= lo, or_(high > hi, low >= lo))
            return and_(low >= lo - w, cond) if w else cond
        if p == "le":  # below the search range, or inside it
            return and_(low <= hi, or_(low < lo, high <= hi))
        if p == "sa":
            return low > hi
        if p == "eb":
            return high < lo
        # ap: the spec leaves the width to the server: 10% of the distance from now, at least a day.
        d = max(abs(self.now_us - lo) // 10, 86_400_000_000)
        return and_(low <= min(hi + d, MAX_US), high >= max(lo - d, MIN_US))

    def _number(self, m: RangeMatch, low: Any, high: Any) -> ColumnElement[bool]:
        p, v = m.prefix, m.value
        if p == "eq":
            return and_(low >= m.lo, high < m.hi)
        if p == "ne":
            return or_(low < m.lo, high >= m.hi)
        if p == "gt":
            return high > v
        if p == "lt":
            return low < v
        if p == "ge":
            return high >= v
        if p == "le":
            return low <= v
        if p == "sa":
            return low > v
        if p == "eb":
            return high < v
        d = abs(v) * 0.1
        return and_(low <= v + d, high >= v - d)

    def _quantity(self, t: Any, m: RangeMatch) -> ColumnElement[bool]:
        cond = self._number(m, t.c.low, t.c.high)
        if m.code is not None:
            if m.system == ANY or m.system is None:
                cond = and_(cond, or_(t.c.unit_code == m.code, t.c.unit == m.code))
            else:
                cond = and_(cond, t.c.system == m.system, t.c.unit_code == m.code)
        elif m.system not in (ANY, None):
            cond = and_(cond, t.c.system == m.system)
        return cond

    def _uri(self, col: Any, m: UriMatch) -> ColumnElement[bool]:
        value = m.value[:KEY_LEN]
        if m.mode == "below":
            return col.like(_like_escape(value) + "%", escape="\\")
        if m.mode == "above":
            return literal(value).like(func.replace(func.replace(col, "%", "\\%"), "_", "\\_") + "%",
                                       escape="\\")
        return col == value

    def _near(self, t: Any, m: NearMatch) -> ColumnElement[bool]:
        # Equirectangular distance: exact enough at city scale and needs no trigonometry in SQL.
        deg = m.km / 111.195
        k = math.cos(math.radians(m.lat))
        dx = (t.c.lon - m.lon) * k
        dy = t.c.lat - m.lat
        return and_(t.c.lat.between(m.lat - deg, m.lat + deg), dx * dx + dy * dy <= deg * deg)

    def _composite(self, t: Any, m: CompositeMatch) -> ColumnElement[bool]:
        conds = []
        for i, (ctype, part) in enumerate(m.parts, start=1):
            s, v, lo, hi = (t.c[f"s{i}"], t.c[f"v{i}"], t.c[f"lo{i}"], t.c[f"hi{i}"])
            if ctype == "token":
                c = [v == part.code[:KEY_LEN]] if part.code is not None else []
                if part.system is None:
                    c.append(s.is_(None))
                elif part.system != ANY:
                    c.append(s == part.system[:KEY_LEN])
                conds.append(and_(true(), *c))
            elif ctype == "quantity":
                c2 = self._number(part, lo, hi)
                if part.code is not None:
                    c2 = and_(c2, v == part.code)
                if part.system not in (ANY, None):
                    c2 = and_(c2, s == part.system)
                conds.append(c2)
            elif ctype == "number":
                conds.append(self._number(part, lo, hi))
            elif ctype == "date":
                conds.append(self._date(part, lo, hi))
            elif ctype == "string":
                conds.append(self._string(v, v, part))
            elif ctype == "reference":
                conds.append(v == (f"{part.target_type}/{part.target_id}" if part.target_type else
                                   part.url or part.target_id))
            elif ctype == "uri":
                conds.append(self._uri(v, part))
        return and_(true(), *conds)

    # -- sorting

    def sort_expr(self, key: SortKey, tcol: Any, icol: Any, r: Any) -> Any:
        if key.table == "_id":
            return r.c.id
        if key.table == "_lastUpdated":
            return r.c.last_updated
        t = TABLES[key.table].alias()
        agg = func.max if key.desc else func.min
        col: Any
        if key.table in ("string", "uri"):
            col = t.c.value
        elif key.table == "token":
            col = func.coalesce(t.c.value, t.c.text)
        elif key.table == "reference":
            col = func.coalesce(t.c.target_id, t.c.url, t.c.ivalue)
        else:
            col = t.c.high if key.desc else t.c.low
        return (select(agg(col)).where(t.c.type == tcol, t.c.id == icol, _code(t, key.code))
                .scalar_subquery())


# ------------------------------------------------------------------ running searches

async def prepare_read(conn: Any, is_sqlite: bool) -> None:
    """Per-transaction settings for searching.

    asyncpg prepares every statement; after five runs PostgreSQL may switch to a generic plan, which for
    ``IN (SELECT …)`` chains cannot see the values and picks scans. Searches always plan for their values.
    """
    if not is_sqlite:
        await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))


@dataclass
class Hit:
    type: str
    id: str
    version: int
    last_updated: int
    content: bytes
    key: list[Any]  # sort values, then type and id: the keyset position


def _after(cols: list[tuple[Any, bool]], last: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``last`` in the lexicographic order ``cols`` ((expr, descending) each)."""
    alts = []
    for i, (expr, desc) in enumerate(cols):
        eqs = [(c.is_(None) if v is None else c == v) for (c, _d), v in zip(cols[:i], last[:i], strict=True)]
        v = last[i]
        if v is None:
            continue  # nothing sorts strictly after NULL within the same null-flag group
        cmp = expr < v if desc else expr > v
        alts.append(and_(true(), *eqs, cmp))
    if not alts:
        return false()
    first, desc0 = cols[0]
    if last[0] is None:
        return or_(*alts)
    # The OR alone is not an index range; the bound on the first key is, so an index walk starts at the
    # cursor instead of at the beginning (page 50 reads one page of index, not fifty).
    return and_(first <= last[0] if desc0 else first >= last[0], or_(*alts))


def _order_cols(compiler: Compiler, sort: Sequence[SortKey], r: Any, system: bool,
                joins: list[tuple[Any, Any]]) -> list[tuple[Any, bool]]:
    cols: list[tuple[Any, bool]] = []
    for k in sort:
        if k.single and k.table in TABLES:
            # One row per resource at most: an outer join sorts all matches in one pass, where a correlated
            # MIN() per match would probe the index once per row.
            t = TABLES[k.table].alias()
            joins.append((t, and_(t.c.type == r.c.type, t.c.id == r.c.id, _code(t, k.code))))
            e = (t.c.value if k.table in ("string", "uri") else (t.c.high if k.desc else t.c.low))
        else:
            e = compiler.sort_expr(k, r.c.type, r.c.id, r)
        if k.table in ("_id", "_lastUpdated"):
            # Never NULL; a constant flag keeps the cursor layout and lets the column's index serve.
            cols.append((literal_column("0"), False))
        else:
            # NULLs (no value) last in both directions, through an explicit flag both backends agree on.
            cols.append((case((e.is_(None), 1), else_=0), False))
        cols.append((e, k.desc))
    if system:
        cols.append((r.c.type, False))
    cols.append((r.c.id, False))
    return cols


async def page(conn: AsyncConnection, *, is_sqlite: bool, types: Sequence[str] | None, nodes: Sequence[Node],
               sort: Sequence[SortKey], count: int, after: list[Any] | None = None, backward: bool = False,
               generic: bool = False) -> tuple[list[Hit], bool]:
    """One page of matches in sort order, after (or, ``backward``, before) a keyset position.

    Returns the hits and whether more rows follow in the direction of travel. ``generic``: no index walk.
    """
    comp = Compiler(is_sqlite)
    r = resources.alias("r")
    single = types[0] if types is not None and len(types) == 1 else None
    if (not generic and single is not None and len(sort) == 1 and sort[0].single and sort[0].table in TABLES
            and not backward and (after is None or after[0] == 0)):
        return await _page_by_index(conn, comp, single, nodes, sort[0], count, after)
    if single is not None and not sort and _driving_clause(nodes):
        return await _page_by_ids(conn, comp, single, nodes, count, after, backward)
    conds = _match_conditions(comp, r, types, single, nodes)
    joins: list[tuple[Any, Any]] = []
    cols = _order_cols(comp, sort, r, single is None, joins)
    # Walking backwards is walking forwards in the reversed order, then flipping the page.
    eff = [(e, (not d) if backward else d) for e, d in cols]
    inner_cols = [e.label(f"k{i}") for i, (e, _d) in enumerate(eff)]
    src: Any = r
    for t, on in joins:
        src = src.outerjoin(t, on)
    # Sort keys and ids only; the stored bytes are joined in for the page's rows alone.
    inner = select(r.c.type.label("rtype"), r.c.id.label("rid"), *inner_cols).select_from(src).where(*conds)
    sub = inner.subquery("m")
    keycols = [(sub.c[f"k{i}"], d) for i, (_e, d) in enumerate(eff)]
    q = select(sub)
    if after is not None:
        q = q.where(_after(keycols, after))
    order = [(c.desc() if d else c.asc()) for c, d in keycols]
    lim = q.order_by(*order).limit(count + 1).subquery("p")
    r2 = resources.alias("r2")
    pkeys = [(lim.c[f"k{i}"], d) for i, (_e, d) in enumerate(eff)]
    q2 = (select(lim.c.rtype, lim.c.rid, r2.c.version, r2.c.last_updated, r2.c.content,
                 *[c for c, _d in pkeys])
          .join_from(lim, r2, and_(r2.c.type == lim.c.rtype, r2.c.id == lim.c.rid))
          .order_by(*[(c.desc() if d else c.asc()) for c, d in pkeys]))
    rows = (await conn.execute(q2)).all()
    more = len(rows) > count
    rows = rows[:count]
    hits = [Hit(row[0], row[1], row[2], row[3], row[4], list(row[5:])) for row in rows]
    if backward:
        hits.reverse()
    return hits, more


def _driving_clause(nodes: Sequence[Node]) -> bool:
    """Some node is a positive index condition: the matches can be found in the index tables alone."""
    return any(isinstance(n, Clause) and not n.negate and n.missing is None for n in nodes)


async def _page_by_ids(conn: AsyncConnection, comp: Compiler, rtype: str, nodes: Sequence[Node], count: int,
                       after: list[Any] | None, backward: bool) -> tuple[list[Hit], bool]:
    """The default order (by id) when an index condition drives the search: page through the matching ids
    in the index tables (index rows exist only for live resources), then fetch just the page's rows —
    instead of probing the resources table once for every match before sorting."""
    m = comp.ids(rtype, nodes).distinct().subquery("m")
    q = select(m.c.id)
    if after is not None:
        q = q.where(m.c.id < after[0] if backward else m.c.id > after[0])
    p = q.order_by(m.c.id.desc() if backward else m.c.id.asc()).limit(count + 1).subquery("p")
    r2 = resources.alias("r2")
    q2 = (select(r2.c.type, r2.c.id, r2.c.version, r2.c.last_updated, r2.c.content)
          .join_from(p, r2, and_(r2.c.type == rtype, r2.c.id == p.c.id))
          .where(r2.c.deleted == false())
          .order_by(r2.c.id.desc() if backward else r2.c.id.asc()))
    rows = (await conn.execute(q2)).all()
    more = len(rows) > count
    hits = [Hit(row[0], row[1], row[2], row[3], row[4], [row[1]]) for row in rows[:count]]
    if backward:
        hits.reverse()
    return hits, more


async def _page_by_index(conn: AsyncConnection, comp: Compiler, rtype: str, nodes: Sequence[Node], key: SortKey,
                         count: int, after: list[Any] | None) -> tuple[list[Hit], bool]:
    """Sorted on one single-valued parameter: walk its index in order and stop after the page, instead of
    sorting every match. Resources without a value come after, in id order (the generic path).

    The walk checks the other conditions row by row, so it wins when they let many rows through; it reads at
    most a budget of index rows, and when the page is not full by then (a selective filter, or the end of the
    values) the generic path answers from the same cursor.
    """
    r = resources.alias("r")
    t = TABLES[key.table].alias("s")
    col = t.c.value if key.table in ("string", "uri") else (t.c.high if key.desc else t.c.low)
    walk = select(t.c.type, t.c.id, col.label("v")).where(t.c.type == rtype, _code(t, key.code))
    if after is not None:
        walk = walk.where(_after([(col, key.desc), (t.c.id, False)], after[1:]))
    budget = max(1000, 20 * (count + 1))
    w = walk.order_by(col.desc() if key.desc else col.asc(), t.c.id.asc()).limit(budget).subquery("w")
    q = (select(r.c.type, r.c.id, r.c.version, r.c.last_updated, r.c.content, w.c.v)
         .select_from(w.join(r, and_(r.c.type == w.c.type, r.c.id == w.c.id)))
         .where(r.c.deleted == false(), *comp.where(nodes, rtype, r.c.type, r.c.id))
         .order_by(w.c.v.desc() if key.desc else w.c.v.asc(), r.c.id.asc()).limit(count + 1))
    if not comp.is_sqlite:
        # The walk only pays off as a nested loop; estimates of how many rows the filters keep are often far
        # off (a hash of every match, then a sort, was chosen at 50% selectivity: 100 ms instead of 2 ms).
        await conn.execute(text("SET LOCAL enable_hashjoin = off"))
        await conn.execute(text("SET LOCAL enable_mergejoin = off"))
    rows = (await conn.execute(q)).all()
    if not comp.is_sqlite:
        await conn.execute(text("SET LOCAL enable_hashjoin = on"))
        await conn.execute(text("SET LOCAL enable_mergejoin = on"))
    hits = [Hit(row[0], row[1], row[2], row[3], row[4], [0, row[5], row[1]]) for row in rows[:count]]
    if len(rows) > count:
        return hits, True
    return await page(conn, is_sqlite=comp.is_sqlite, types=[rtype], nodes=nodes, sort=[key], count=count,
                      after=after, generic=True)


def _match_conditions(comp: Compiler, r: Any, types: Sequence[str] | None, single: str | None,
                      nodes: Sequence[Node]) -> list[ColumnElement[bool]]:
    """Live resources of the searched type(s) that satisfy every search node."""
    conds: list[ColumnElement[bool]] = [r.c.deleted == false()]
    if single is not None:
        conds.append(r.c.type == single)
    elif types is not None:
        conds.append(r.c.type.in_(list(types)))
    conds += comp.where(nodes, single, r.c.type, r.c.id)
    return conds


async def count_matches(conn: AsyncConnection, *, is_sqlite: bool, types: Sequence[str] | None,
                        nodes: Sequence[Node]) -> int:
    comp = Compiler(is_sqlite)
    r = resources.alias("r")
    single = types[0] if types is not None and len(types) == 1 else None
    if single is not None and _driving_clause(nodes):
        # Counted in the index tables alone (see _page_by_ids).
        ids = comp.ids(single, nodes).distinct().subquery("m")
        return int((await conn.execute(select(func.count()).select_from(ids))).scalar_one())
    conds = _match_conditions(comp, r, types, single, nodes)
    return int((await conn.execute(select(func.count()).select_from(r).where(*conds))).scalar_one())


async def match_ids(conn: AsyncConnection, *, is_sqlite: bool, rtype: str, nodes: Sequence[Node],
                    limit: int) -> list[str]:
    comp = Compiler(is_sqlite)
    q = comp.ids(rtype, nodes).distinct().limit(limit)  # one resource may match through several rows
    return [row[0] for row in (await conn.execute(q)).all()]


async def include_targets(conn: AsyncConnection, sources: Sequence[tuple[str, str]], codes: Sequence[str] | None,
                          target_type: str | None, limit: int) -> list[tuple[str, str]]:
    """(type, id) of resources the given resources point at through reference parameters ``codes``."""
    t = reference_t
    out: list[tuple[str, str]] = []
    by_type: dict[str, list[str]] = {}
    for ty, i in sources:
        by_type.setdefault(ty, []).append(i)
    for ty, ids in by_type.items():
        q = select(t.c.target_type, t.c.target_id).distinct().where(
            t.c.type == ty, t.c.id.in_(ids), t.c.target_id.is_not(None))
        if codes is not None:
            q = q.where(_codes(t, codes))
        if target_type is not None:
            q = q.where(t.c.target_type == target_type)
        out += [(row[0], row[1]) for row in (await conn.execute(q.limit(limit + 1))).all()]
    return out


async def revinclude_sources(conn: AsyncConnection, source_type: str, codes: Sequence[str] | None,
                             targets: Sequence[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """(type, id) of ``source_type`` resources pointing at any of ``targets`` through ``codes``."""
    t = reference_t
    out: list[tuple[str, str]] = []
    by_type: dict[str, list[str]] = {}
    for ty, i in targets:
        by_type.setdefault(ty, []).append(i)
    for ty, ids in by_type.items():
        q = select(t.c.type, t.c.id).distinct().where(t.c.target_type == ty, t.c.target_id.in_(ids))
        if source_type != "*":
            q = q.where(t.c.type == source_type)
        if codes is not None:
            q = q.where(_codes(t, codes))
        out += [(row[0], row[1]) for row in (await conn.execute(q.limit(limit + 1))).all()]
    return out


async def fetch(conn: AsyncConnection, *, is_sqlite: bool, keys: Sequence[tuple[str, str]],
                restrict: dict[str, list[Node]] | None = None) -> list[Hit]:
    """Live resources by (type, id); ``restrict`` adds conditions per type (authorisation)."""
    comp = Compiler(is_sqlite)
    by_type: dict[str, list[str]] = {}
    for ty, i in keys:
        by_type.setdefault(ty, []).append(i)
    out: list[Hit] = []
    r = resources.alias("r")
    for ty, ids in sorted(by_type.items()):
        for i in range(0, len(ids), 500):
            conds = [r.c.type == ty, r.c.id.in_(ids[i:i + 500]), r.c.deleted == false()]
            if restrict is not None and ty in restrict:
                conds += comp.where(restrict[ty], ty, r.c.type, r.c.id)
            q = select(r.c.type, r.c.id, r.c.version, r.c.last_updated, r.c.content).where(*conds)
            out += [Hit(row[0], row[1], row[2], row[3], row[4], []) for row in (await conn.execute(q)).all()]
    return out
