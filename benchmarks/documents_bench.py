"""Clinical documents: how many Form 096 documents DHP accepts per second, and what splitting costs.

Run: ``python benchmarks/documents_bench.py [--docs N] [--concurrency C]`` (starts its own PostgreSQL with
``tests/pgserver.py``; ``--sqlite`` measures the embedded backend instead).

Each document is a Form 096 of 17 entries (twins, one stillborn, an APGAR series, the mother, the birth
encounter, practitioner, role, organization) with unique identifiers. Figures, all in the same process and
database, through ``crud.create`` (the path ``POST /fhir/Bundle`` takes, minus HTTP):

- **ceiling**: the same Bundle stored as an ordinary ``collection`` Bundle with validation off — one row,
  its history and its search index: what the write path costs with nothing of the document work;
- **validate only**: the document checks + profile validation of the whole document, no write;
- **store only**: a document accepted with splitting off (validate + store the bytes + DocumentReference);
- **full**: validate + store + index + split into atomic resources (+ Provenance), the default.

It prints documents/second for each and the ratios full/store-only (the cost of splitting) and
full/ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.documents import fixtures as fx  # noqa: E402

from dhp.api.app import build_server  # noqa: E402
from dhp.conformance import load_registry  # noqa: E402
from dhp.documents.igbuild import PACKAGE_ID, PACKAGE_VERSION  # noqa: E402
from dhp.interactions import crud  # noqa: E402
from dhp.interactions.context import RequestContext  # noqa: E402
from dhp.settings import DEFAULT_PACKAGES, Settings  # noqa: E402

IG = ROOT / "src" / "dhp" / "documents" / "ig"


def documents(n: int) -> list[dict[str, Any]]:
    return [fx.form_096(mother_pinfl="5" + str(uuid.uuid4().int)[:13]) for _ in range(n)]


async def run(server: Any, bundles: list[dict[str, Any]], concurrency: int, as_collection: bool = False) -> float:
    ctx = RequestContext(base_url="http://bench/fhir")
    queue = list(bundles)

    async def worker() -> None:
        while queue:
            b = queue.pop()
            if as_collection:
                b = {**b, "type": "collection"}
            res = await crud.create(server, ctx, "Bundle", b)
            assert res.status == 201, res.status

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(bundles) / (time.perf_counter() - t0)


def validate_rate(server: Any, bundles: list[dict[str, Any]]) -> float:
    from dhp.documents.checks import document_kind

    svc = server.documents
    t0 = time.perf_counter()
    for b in bundles:
        issues = svc.profile_issues(b, document_kind(b["entry"][0]["resource"]), None)
        assert not [i for i in issues if i.severity == "error"]
    return len(bundles) / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sqlite", action="store_true")
    args = ap.parse_args()
    pg = None
    if args.sqlite:
        url = f"sqlite+aiosqlite:///{Path('/tmp') / ('docbench-' + uuid.uuid4().hex[:8] + '.db')}"
    else:
        from tests.pgserver import PgServer

        pg = PgServer()
        pg.start()
        url = pg.create_db("docbench")
    base = Settings.from_env(database_url=url, auth="off", validation="strict", package_import="ig",
                             package_path=f"{Settings().package_path}:{IG}",
                             packages=f"{DEFAULT_PACKAGES},{PACKAGE_ID}#{PACKAGE_VERSION}")
    registry = load_registry(base)
    full = await build_server(base, registry)
    store_only = await build_server(dataclasses.replace(base, document_split=False), registry, install=False)
    ceiling = await build_server(dataclasses.replace(base, validation="off"), registry, install=False)
    try:
        await run(full, documents(10), 1)  # warm-up: compiled profiles, caches, connections
        results: dict[str, list[float]] = {"ceiling": [], "validate": [], "store": [], "full": []}
        for _ in range(args.rounds):
            results["ceiling"].append(await run(ceiling, documents(args.docs), args.concurrency, as_collection=True))
            results["validate"].append(validate_rate(full, documents(args.docs)))
            results["store"].append(await run(store_only, documents(args.docs), args.concurrency))
            results["full"].append(await run(full, documents(args.docs), args.concurrency))
        med = {k: statistics.median(v) for k, v in results.items()}
        backend = "SQLite" if args.sqlite else "PostgreSQL"
        entries = len(documents(1)[0]["entry"])
        print(f"Form 096 documents of {entries} entries on {backend}, {args.docs} per round, concurrency "
              f"{args.concurrency}, median of {args.rounds} rounds (all rounds in brackets):")
        for k, label in (("ceiling", "ceiling: same Bundle as a plain collection, validation off"),
                         ("validate", "validate only (document rules + profiles, no write)"),
                         ("store", "accepted, split off (validate + store + DocumentReference)"),
                         ("full", "accepted, split on (validate + store + index + split)")):
            runs = ", ".join(f"{x:.1f}" for x in results[k])
            print(f"  {label:62s} {med[k]:8.1f} docs/s  [{runs}]")
        print(f"  cost of splitting: full / store-only time = {med['store'] / med['full']:.2f}x")
        print(f"  full / ceiling time = {med['ceiling'] / med['full']:.1f}x; "
              f"validation share of a full accept = {med['full'] / med['validate']:.0%}")
    finally:
        for s in (full, store_only, ceiling):
            await s.store.close()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
