"""What PostgreSQL spends on a create's search index, per index layout: capture the real write statements of
the create mix, then replay them one at a time into fresh databases whose search tables differ.

    python benchmarks/pg_write_replay.py [--creates 3000] [--writers 32] [--rounds 4]

1. Starts PostgreSQL (tests/pgserver.py), runs the create mix of ``search_bench.py`` in process with
   ``--writers`` concurrent writers and captures each write statement the store sends (``flush_statement``).
   Concurrent writers share statements (group commit): 32 writers give ~16 creates a statement, what 32 HTTP
   connections give.
2. Replays the captured statements on one connection into a fresh database per layout, rounds alternating,
   and reports the backend's CPU (``/proc``) and wall time per create: median and minimum over the rounds
   (this machine's noise is one-sided: the minimum is the least disturbed round).

Layouts:
- ``as built``: the migrations' schema;
- ``no (type, id) index``: the search tables without their per-resource index;
- ``no search index``: the search tables without any index (the rows alone);
- ``parameter keys``: rows keyed by (type, id) as built, but a 64-bit parameter key in place of the code, and the
  value indexes lead with it instead of (type, code);
- ``hashed (type, id) index``: the per-resource index on ``hashtext(id)`` (4 bytes) instead of (type, id);
- ``integer keys``: a prototype of a narrower layout — each search row keyed by a 64-bit resource key
  (assigned in time order, also stored in ``resources`` under a unique index) and a parameter key standing
  for (type, code), instead of the type, id and code strings; the same value indexes on those keys. The
  captured rows are rewritten to it before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_bench import create_mix  # noqa: E402
from synthetic import Generator, Sizes  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402

import dhp.store as store_mod  # noqa: E402
from dhp.store.search import COLUMNS, TABLES, _pg_type  # noqa: E402

console = Console()
Statement = tuple[str, tuple[Any, ...]]

#: The value indexes of the integer-key prototype: the built ones with (type, code) → pkey, id → rkey.
_INT_INDEXES: dict[str, list[tuple[str, ...]]] = {
    "string": [("pkey", "value", "rkey")], "token": [("pkey", "value", "system", "rkey")],
    "reference": [("pkey", "target_type", "target_id", "rkey"), ("target_type", "target_id")],
    "date": [("pkey", "low", "high", "rkey"), ("pkey", "high", "rkey")], "number": [("pkey", "low", "rkey")],
    "quantity": [("pkey", "low", "rkey")], "uri": [("pkey", "value", "rkey")], "composite": [("pkey", "v1", "v2")],
    "near": [("pkey", "lat", "lon")]}

_INSERT_CTE = re.compile(r"i_(\w+) AS \(INSERT INTO search_\w+ \([^)]*\) SELECT .*? "
                         r"FROM jsonb_array_elements\(\$(\d+)::text::jsonb\) AS e\)")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


async def capture(url: str, creates: int, writers: int) -> list[Statement]:
    """The write statements of ``creates`` creates of the mix, ``writers`` at a time."""
    from dhp.api.app import build_server
    from dhp.interactions import crud
    from dhp.interactions.context import RequestContext
    from dhp.settings import Settings

    settings = Settings.from_env({**os.environ, "DHP_DATABASE_URL": url, "DHP_AUTH": "off",
                                  "DHP_VALIDATION": "off"})
    server = await build_server(settings)
    ctx = RequestContext(base_url="http://bench/fhir")
    gen = Generator(Sizes(patients=max(creates // 10, 1)), seed=11)
    queue = [r for i in range(max(creates // 10, 1)) for r in create_mix(gen, i)][::-1]
    got: list[Statement] = []
    built = store_mod.flush_statement

    def keep(p: Any) -> Statement:
        s = built(p)
        got.append(s)
        return s

    store_mod.flush_statement = keep  # the store calls it through its module (``dhp.store``)
    try:
        async def writer() -> None:
            while queue:
                r = dict(queue.pop())
                r.pop("id", None)
                await crud.create(server, ctx, r["resourceType"], r)

        await asyncio.gather(*(writer() for _ in range(writers)))
    finally:
        store_mod.flush_statement = built
        await server.store.close()
    return got


def _rewrite_index_rows(sql: str, ps: list[Any], row: Any, lead: list[tuple[str, str]]) -> str:
    """``sql`` with its search-row CTEs taking ``lead`` ((column, cast) pairs) in place of type, id and code;
    each row of their JSON parameters (in ``ps``, changed in place) is mapped by ``row``."""
    out = sql
    for m in _INSERT_CTE.finditer(sql):
        kind, n = m.group(1), int(m.group(2))
        ps[n - 1] = orjson.dumps([row(r) for r in orjson.loads(ps[n - 1])]).decode()
        t = TABLES[kind]
        leads = ", ".join(f"(e->>{i}){cast}" for i, (_c, cast) in enumerate(lead))
        picks = ", ".join(f"(e->>{i + len(lead)})::{_pg_type(t.c[c])}" for i, c in enumerate(COLUMNS[kind]))
        out = out.replace(m.group(0), f"i_{kind} AS (INSERT INTO search_{kind} ({', '.join(c for c, _ in lead)}, "
                          f"{', '.join(COLUMNS[kind])}) SELECT {leads}, {picks} "
                          f"FROM jsonb_array_elements(${n}::text::jsonb) AS e)")
    return out


def _keyed_tables(lead: str, per_resource: str, id_col: str) -> list[str]:
    """DDL replacing the search tables: columns ``lead`` before the values, a per-resource index on
    ``per_resource``, and the value indexes of :data:`_INT_INDEXES` with ``id_col`` for the resource key."""
    ddl = []
    for kind, t in TABLES.items():
        cols = ", ".join(f"{c} {_pg_type(t.c[c])}" for c in COLUMNS[kind])
        ddl += [f"DROP TABLE search_{kind}", f"CREATE TABLE search_{kind} ({lead}, {cols})",
                f"CREATE INDEX ix_{kind}_res ON search_{kind} ({per_resource})"]
        for i, ix in enumerate(_INT_INDEXES[kind]):
            ops = " varchar_pattern_ops" if kind in ("string", "uri") else ""
            cols_ix = ", ".join((id_col if c == "rkey" else c) + (ops if c == "value" else "") for c in ix)
            ddl.append(f"CREATE INDEX ix_{kind}_{i} ON search_{kind} ({cols_ix})")
    return [
        *ddl, "CREATE INDEX ix_reference_url ON search_reference (pkey, url) WHERE url IS NOT NULL",
        "CREATE INDEX ix_reference_ivalue ON search_reference (pkey, ivalue) WHERE ivalue IS NOT NULL",
        "CREATE INDEX ix_string_trgm ON search_string USING gin (value gin_trgm_ops)"]


def integer_keys(stmts: list[Statement]) -> tuple[list[Statement], list[str]]:
    """The statements rewritten to the integer-key prototype, and its DDL."""
    rkeys: dict[tuple[str, str], int] = {}
    pkeys: dict[tuple[str, str], int] = {}

    def rkey(t: str, i: str) -> int:
        return rkeys.setdefault((t, i), (1 << 40) + len(rkeys))  # time order: the order of creation

    def row(r: list[Any]) -> list[Any]:
        return [rkey(r[0], r[1]), pkeys.setdefault((r[0], r[2]), len(pkeys) + 1), *r[3:]]

    out: list[Statement] = []
    for sql, params in stmts:
        ps = list(params)
        # The resources' rows ($2: after the contents array) gain their key as a last column.
        ps[1] = orjson.dumps([[*r, rkey(r[0], r[1])] for r in orjson.loads(ps[1])]).decode()
        sql2 = sql.replace("package, content, index_key) SELECT", "package, content, index_key, rkey) SELECT", 1)
        sql2 = re.sub(r"(\(e->>8\)::BIGINT) FROM jsonb_array_elements\(\$2", r"\1, (e->>9)::bigint FROM "
                      r"jsonb_array_elements($2", sql2, count=1)
        sql2 = _rewrite_index_rows(sql2, ps, row, [("rkey", "::bigint"), ("pkey", "::bigint")])
        out.append((sql2, tuple(ps)))
    ddl = ["ALTER TABLE resources ADD COLUMN rkey bigint", "CREATE UNIQUE INDEX ix_resources_rkey ON resources (rkey)"]
    return out, ddl + _keyed_tables("rkey bigint NOT NULL, pkey bigint NOT NULL", "rkey", "rkey")


def parameter_keys(stmts: list[Statement]) -> tuple[list[Statement], list[str]]:
    """The statements rewritten to rows keyed by (type, id, pkey): a 64-bit parameter key in place of the code."""
    pkeys: dict[tuple[str, str], int] = {}

    def row(r: list[Any]) -> list[Any]:
        return [r[0], r[1], pkeys.setdefault((r[0], r[2]), (1 << 50) + len(pkeys)), *r[3:]]

    out: list[Statement] = []
    for sql, params in stmts:
        ps = list(params)
        out.append((_rewrite_index_rows(sql, ps, row, [("type", ""), ("id", ""), ("pkey", "::bigint")]), tuple(ps)))
    lead = "type varchar(64) NOT NULL, id varchar(64) NOT NULL, pkey bigint NOT NULL"
    return out, _keyed_tables(lead, "type, id", "id")


_DROP_ALL = ("DO $$ DECLARE r record; BEGIN FOR r IN SELECT indexname FROM pg_indexes "
             "WHERE tablename LIKE 'search\\_%' LOOP EXECUTE 'DROP INDEX ' || r.indexname; END LOOP; END $$")


async def replay(pg: PgServer, name: str, stmts: list[Statement], ddl: list[str], creates: int,
                 ) -> tuple[float, float]:
    """Backend CPU and wall time (µs) per create, replaying ``stmts`` into a fresh database changed by ``ddl``."""
    import asyncpg

    from dhp.store import Store

    url = pg.create_db(name)
    s = Store(url)
    await s.open(migrate=True)
    await s.close()
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user=pg.user, database=name)
    try:
        for q in ddl:
            await conn.execute(q)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        for sql, params in stmts:
            await conn.execute(sql, *params)
        return (cpu_seconds(pid) - c0) / creates * 1e6, (time.perf_counter() - t0) / creates * 1e6
    finally:
        await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=3000)
    ap.add_argument("--writers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    pg = PgServer()
    pg.start()
    try:
        stmts = await capture(pg.create_db("capture"), args.creates, args.writers)
        console.print(f"captured {len(stmts)} statements: {args.creates / len(stmts):.1f} creates each")
        ints, int_ddl = integer_keys(stmts)
        layouts: dict[str, tuple[list[Statement], list[str]]] = {
            "as built": (stmts, []),
            "no (type, id) index": (stmts, [f"DROP INDEX ix_search_{k}_res" for k in TABLES]),
            "no search index": (stmts, [_DROP_ALL]),
            "parameter keys": parameter_keys(stmts),
            "hashed (type, id) index": (stmts, [q for k in TABLES for q in (
                f"DROP INDEX ix_search_{k}_res", f"CREATE INDEX ix_search_{k}_hres ON search_{k} (hashtext(id))")]),
            "integer keys": (ints, int_ddl),
        }
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in layouts}
        n = 0
        for rnd in range(args.rounds):
            for name, (ss, ddl) in layouts.items():
                n += 1
                r = await replay(pg, f"replay_{n}", ss, ddl, args.creates)
                got[name].append(r)
                console.print(f"  round {rnd + 1}, {name}: CPU {r[0]:.0f} µs, wall {r[1]:.0f} µs per create")
        table = Table(title=f"PostgreSQL per create, {args.creates / len(stmts):.0f} creates a statement")
        for col in ("layout", "CPU median", "CPU min", "wall median", "wall min", "CPU min vs as built"):
            table.add_column(col, justify="left" if col == "layout" else "right")
        base = min(c for c, _ in got["as built"])
        for name, rs in got.items():
            cpu, wall = [c for c, _ in rs], [w for _, w in rs]
            table.add_row(name, f"{statistics.median(cpu):.0f} µs", f"{min(cpu):.0f} µs",
                          f"{statistics.median(wall):.0f} µs", f"{min(wall):.0f} µs", f"{min(cpu) / base:.2f}")
        console.print(table)
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
