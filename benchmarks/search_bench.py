"""Search at scale: load a synthetic Uzbek data set through transactions, then time the searches clinicians run.

    python benchmarks/search_bench.py --patients 50000            # the issue's full size on PostgreSQL
    python benchmarks/search_bench.py --patients 2000 --backend sqlite

What it does, in one run:

1. starts PostgreSQL (tests/pgserver.py) unless ``--db-url`` is given, and a DHP server (uvicorn, its own process);
2. loads organizations, practitioners, patients (PINFL, Latin + Cyrillic names, mahalla-coded addresses),
   encounters and observations (LOINC, UCUM) as transaction Bundles, with a progress bar: the load rate;
3. times each query kind over HTTP (p50/p95, ms) against the issue's targets;
4. measures create throughput with search indexing and without — the ratio is what the issue bounds at
   >= 50% — two ways: over HTTP (how clients create: ``wrk`` against a server process with indexing and one
   with the search engine detached, ``benchmarks/noindex_app.py``, rounds alternating), and in-process (the
   interaction layer without HTTP, one writer and eight at once), where indexing is a larger share.

``--creates-only`` skips the load and the queries (step 4 alone, on fresh databases).

Profile validation is off for the load (it measures search and storage, not validation).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic import LOINC, PINFL, VITALS, Generator, Sizes  # noqa: E402

console = Console()

SINGLE_TARGET_MS = 50.0
COMPLEX_TARGET_MS = 150.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(db_url: str, log: Path, app: str = "dhp.api:create_app") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "DHP_DATABASE_URL": db_url, "DHP_AUTH": "off", "DHP_VALIDATION": "off",
           "DHP_LOG_LEVEL": "warning", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'benchmarks'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/fhir"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        try:
            if httpx.get(base + "/metadata", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


# ------------------------------------------------------------------ loading

async def load(base: str, gen: Generator, batch: int, workers: int) -> tuple[int, float]:
    sizes = gen.sizes
    per_patient = 1 + sizes.encounters_per_patient + sizes.observations_per_patient
    total = sizes.organizations + sizes.practitioners + sizes.patients * per_patient
    queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue(maxsize=workers * 2)
    done = 0
    errors: list[str] = []

    async def worker(client: httpx.AsyncClient, progress: Progress, task: Any) -> None:
        nonlocal done
        while True:
            chunk = await queue.get()
            if chunk is None:
                return
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in chunk]}
            for attempt in range(5):
                resp = await client.post(base + "/", json=bundle, headers={"Content-Type": "application/fhir+json"})
                if resp.status_code == 200:
                    break
                if attempt == 4:
                    errors.append(f"{resp.status_code} {resp.text[:500]}")
                await asyncio.sleep(0.2 * (attempt + 1))
            done += len(chunk)
            progress.update(task, advance=len(chunk))

    def chunks() -> Any:
        buf: list[dict[str, Any]] = []
        for r in [*gen.organizations(), *gen.practitioners()]:
            buf.append(r)
        for i in range(sizes.patients):
            buf.append(gen.patient(i))
            buf.extend(gen.clinical(i))
            if len(buf) >= batch:
                yield buf
                buf = []
        if buf:
            yield buf

    t0 = time.perf_counter()
    with Progress(TextColumn("loading"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("load", total=total, rate="")
        async with httpx.AsyncClient(timeout=300) as client:
            ws = [asyncio.create_task(worker(client, progress, task)) for _ in range(workers)]
            for c in chunks():
                await queue.put(c)
                el = time.perf_counter() - t0
                progress.update(task, rate=f"{done / el:,.0f} res/s" if el > 0 else "")
            for _ in ws:
                await queue.put(None)
            await asyncio.gather(*ws)
    if errors:
        raise RuntimeError(f"{len(errors)} transactions failed, first: {errors[0]}")
    return total, time.perf_counter() - t0


def replay(gen: Generator) -> int:
    """Walk the generator as a load would (same random sequence), without sending: the ids and PINFLs."""
    n = len(list(gen.organizations())) + len(list(gen.practitioners()))
    for i in range(gen.sizes.patients):
        gen.patient(i)
        n += 1 + len(list(gen.clinical(i)))
    return n


# ------------------------------------------------------------------ queries

def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def query_kinds(gen: Generator, rng: random.Random) -> list[tuple[str, bool, Any]]:
    n = gen.sizes.patients
    fams = [f for f, _c in __import__("synthetic").FAMILY]

    def pid() -> str:
        return f"pat-{rng.randrange(n)}"

    def ident() -> str:
        return gen.pinfls[rng.randrange(n)]

    def code() -> str:
        return rng.choice(VITALS)[0]

    def year() -> int:
        return rng.randint(1941, 2022)

    def month_range() -> str:
        y, m = year(), rng.randint(1, 11)
        return f"birthdate=ge{y}-{m:02d}-01&birthdate=lt{y}-{m + 1:02d}-01"

    def obs_q() -> str:
        y = rng.randint(2021, 2024)
        return f"Observation?subject=Patient/{pid()}&code={LOINC}|{code()}&date=ge{y}-01-01&date=lt{y + 1}-01-01"

    return [
        ("identifier token", False, lambda: f"Patient?identifier={PINFL}|{ident()}"),
        ("name prefix", False, lambda: f"Patient?name={rng.choice(fams)[:5]}&_count=20"),
        ("name :contains", False, lambda: f"Patient?name:contains={rng.choice(fams)[2:6]}&_count=20"),
        ("name Cyrillic", False, lambda: "Patient?name=" + rng.choice(__import__("synthetic").FAMILY)[1][:4]
                                         + "&_count=20"),
        ("birthdate range", False, lambda: f"Patient?{month_range()}&_count=20"),
        ("Observation subject+code+date", False, obs_q),
        ("chain subject:Patient.identifier", True,
         lambda: f"Observation?subject:Patient.identifier={PINFL}|{ident()}&code={code()}"),
        ("_revinclude Observation:subject", True,
         lambda: f"Patient?_id={pid()}&_revinclude=Observation:subject"),
        ("_has Observation code", True,
         lambda: f"Patient?_has:Observation:subject:code={code()}&{month_range()}"),
        ("Encounter + _include subject", True,
         lambda: f"Encounter?subject=Patient/{pid()}&_include=Encounter:subject&_include=Encounter:participant"),
    ]


def run_queries(base: str, gen: Generator, reps: int, pages: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    results = []
    with httpx.Client(timeout=120) as c:
        # The floor: an empty endpoint on the same server and stack, timed in the same run.
        floor = []
        root = base.rsplit("/fhir", 1)[0]
        for _ in range(max(reps, 50)):
            t0 = time.perf_counter()
            c.get(f"{root}/healthz")
            floor.append((time.perf_counter() - t0) * 1000)
        results.append({"kind": "ceiling: GET /healthz (empty endpoint)", "complex": False, "n": len(floor),
                        "p50": pct(floor, 0.5), "p95": pct(floor, 0.95), "avg_entries": 0})
        for name, complex_, make in query_kinds(gen, rng):
            times: list[float] = []
            hits = 0
            for i in range(reps + 3):
                url = f"{base}/{make()}"
                t0 = time.perf_counter()
                r = c.get(url)
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
                if i >= 3:  # warm-up
                    times.append(dt)
                    hits += len(r.json().get("entry", []))
            results.append({"kind": name, "complex": complex_, "n": len(times), "p50": pct(times, 0.5),
                            "p95": pct(times, 0.95), "avg_entries": hits / max(len(times), 1)})
        # sorted paging: follow next links to page `pages`, time each page fetch
        times = []
        walks = max(2, reps // 20)
        for _ in range(walks):
            url = f"{base}/Patient?_sort=birthdate&_count=20&gender={rng.choice(['male', 'female'])}"
            for page in range(1, pages + 1):
                t0 = time.perf_counter()
                b = c.get(url).json()
                dt = (time.perf_counter() - t0) * 1000
                if page == pages:
                    times.append(dt)
                nxt = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
                if nxt is None:
                    break
                url = nxt
        results.append({"kind": f"sorted paging, page {pages}", "complex": False, "n": len(times),
                        "p50": pct(times, 0.5), "p95": pct(times, 0.95), "avg_entries": 20})
    return results


# ------------------------------------------------------------------ create throughput with / without indexing

def create_mix(gen: Generator, i: int) -> list[dict[str, Any]]:
    """The resources the create measurements post per patient: the Patient and nine of its clinical ones."""
    return [gen.patient(i), *list(gen.clinical(i))[:9]]


async def create_throughput(db_url: str, n: int, rounds: int, concurrency: int) -> tuple[float, float]:
    """Creates/s with the search engine attached and detached, ``concurrency`` writers at once (a server has
    many clients; one at a time shows the latency-bound case). Rounds alternate so both see the same load."""
    from dhp.api.app import build_server, settle_heap
    from dhp.interactions import crud
    from dhp.interactions.context import RequestContext
    from dhp.settings import Settings

    settings = Settings.from_env({**os.environ, "DHP_DATABASE_URL": db_url, "DHP_AUTH": "off",
                                  "DHP_VALIDATION": "off"})
    server = await build_server(settings)
    settle_heap()  # as a server process does once start-up is done (dhp.api.app.create_process_app)
    ctx = RequestContext(base_url="http://bench/fhir")
    gen = Generator(Sizes(patients=n), seed=7 + concurrency)
    engine = server.search
    with_idx: list[float] = []
    without: list[float] = []
    counter = 0

    async def one_round(indexing: bool) -> float:
        nonlocal counter
        server.search = engine if indexing else None
        items = []
        for _ in range(n // 10):
            items.extend(create_mix(gen, counter))
            counter += 1
        queue = list(reversed(items))

        async def writer() -> None:
            while queue:
                r = dict(queue.pop())
                r.pop("id", None)
                await crud.create(server, ctx, r["resourceType"], r)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(concurrency)))
        return len(items) / (time.perf_counter() - t0)

    await one_round(True)  # warm-up: compiled expressions, connection pools
    for _ in range(rounds):
        with_idx.append(await one_round(True))
        without.append(await one_round(False))
    server.search = engine
    await server.store.close()
    return statistics.median(with_idx), statistics.median(without)


_LUA_CREATES = """
local bodies = {%s}
local paths = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", paths[i], {["Content-Type"] = "application/fhir+json"}, bodies[i])
end
"""


def http_create_throughput(new_db: Any, tmp: Path, n: int, rounds: int, duration: int, connections: int,
                           ) -> tuple[float, float, int]:
    """Creates/s over HTTP with indexing and without (median of ``rounds`` alternating wrk runs), and the
    number of failed requests. Two server processes, each on its own fresh database, run side by side; only
    one is loaded at a time. Both are server processes as ``dhp serve --workers N`` starts them."""
    import orjson
    from rest_bench import wrk

    gen = Generator(Sizes(patients=max(n // 10, 1)), seed=99)
    items = [r for i in range(max(n // 10, 1)) for r in create_mix(gen, i)]
    bodies, paths = [], []
    for r in items:
        r = {k: v for k, v in r.items() if k != "id"}
        bodies.append("[==[" + orjson.dumps(r).decode() + "]==]")
        paths.append(f'"/fhir/{r["resourceType"]}"')
    script = _LUA_CREATES % (",\n".join(bodies), ", ".join(paths))
    servers = {}
    try:
        for name, app in (("with", "dhp.api.app:create_process_app"), ("without", "noindex_app:create_app")):
            proc, base = start_server(new_db(f"http_{name}"), tmp / f"server_{name}.log", app)
            servers[name] = (proc, base.removesuffix("/fhir"))
        got: dict[str, list[float]] = {"with": [], "without": []}
        errors = 0
        for _p, base in servers.values():
            wrk(base + "/fhir", script, 3, connections)  # warm-up
        for _ in range(rounds):
            for name, (_p, base) in servers.items():
                r = wrk(base + "/fhir", script, duration, connections)
                got[name].append(r["rps"])
                errors += int(r["errors"])
                console.print(f"  HTTP creates, {name} indexing: {r['rps']:,.0f}/s (p50 {r['p50_ms']:.1f} ms, "
                              f"p99 {r['p99_ms']:.1f} ms, {int(r['errors'])} errors)")
    finally:
        for proc, _b in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return statistics.median(got["with"]), statistics.median(got["without"]), errors


# ------------------------------------------------------------------ main

def run_data_set(args: argparse.Namespace, new_db: Any, tmp: Path, vacuum: Any,
                 ) -> tuple[int, float, list[dict[str, Any]]]:
    """Load the data set (unless ``--skip-load``) and time the queries over HTTP."""
    db_url = args.db_url or new_db("bench")
    console.print(f"[bold]DHP search benchmark[/] — {args.patients:,} patients on {args.backend}")
    t0 = time.perf_counter()
    proc, base = start_server(db_url, tmp / "server.log")
    console.print(f"server up in {time.perf_counter() - t0:.1f}s (package install and indexing included)")
    try:
        gen = Generator(Sizes(args.patients, args.encounters_per_patient, args.observations_per_patient),
                        args.seed)
        if args.skip_load:
            total, secs = replay(gen), float("nan")
        else:
            total, secs = asyncio.run(load(base, gen, args.batch, args.workers))
            console.print(f"loaded {total:,} resources in {secs:.0f}s: "
                          f"[bold]{total / secs:,.0f} resources/s[/]")
        if args.backend == "pg":
            vacuum(db_url)
        return total, secs, run_queries(base, gen, args.reps, args.pages, args.seed)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=50000)
    ap.add_argument("--observations-per-patient", type=int, default=10)
    ap.add_argument("--encounters-per-patient", type=int, default=2)
    ap.add_argument("--backend", choices=["pg", "sqlite"], default="pg")
    ap.add_argument("--db-url", default="", help="use this database instead of starting one")
    ap.add_argument("--batch", type=int, default=250, help="resources per transaction Bundle")
    ap.add_argument("--workers", type=int, default=2, help="concurrent transactions while loading")
    ap.add_argument("--reps", type=int, default=100, help="timed queries per kind")
    ap.add_argument("--pages", type=int, default=50)
    ap.add_argument("--creates", type=int, default=1000, help="resources per create-throughput round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-load", action="store_true",
                    help="the database (--db-url) already holds this data set: only time the queries")
    ap.add_argument("--skip-creates", action="store_true", help="leave out the create-throughput comparison")
    ap.add_argument("--creates-only", action="store_true", help="only the create-throughput comparison")
    ap.add_argument("--http-duration", type=int, default=8, help="seconds per HTTP create round")
    ap.add_argument("--connections", type=int, default=32, help="concurrent HTTP connections for creates")
    args = ap.parse_args()

    pg = None
    tmp = Path(tempfile.mkdtemp(prefix="dhp-searchbench-"))

    def new_db(name: str) -> str:
        nonlocal pg
        if args.backend == "sqlite":
            return f"sqlite+aiosqlite:///{tmp / (name + '.db')}"
        if pg is None:
            from tests.pgserver import PgServer

            pg = PgServer()
            pg.start()
        return pg.create_db(f"{name}_{uuid.uuid4().hex[:6]}")

    def vacuum(db_url: str) -> None:
        # Fresh tables: statistics and a merged GIN pending list, as autovacuum gives shortly after a load.
        subprocess.run([str(pg.bindir / "psql") if pg else "psql", db_url.replace("+asyncpg", ""),
                        "-q", "-c", "VACUUM ANALYZE"], check=False, capture_output=True)

    results: list[dict[str, Any]] = []
    total, secs = 0, float("nan")
    creates: dict[int, tuple[float, float]] = {}
    http: tuple[float, float, int] | None = None
    try:
        if not args.creates_only:
            total, secs, results = run_data_set(args, new_db, tmp, vacuum)
        if not args.skip_creates:
            if shutil.which("wrk"):
                http = http_create_throughput(new_db, tmp, args.creates, args.rounds, args.http_duration,
                                              args.connections)
            else:
                console.print("[yellow]wrk not found (apt-get install wrk): no HTTP create measurement[/]")
            for conc in (1, 8):
                creates[conc] = asyncio.run(create_throughput(new_db(f"creates{conc}"), args.creates, args.rounds,
                                                              conc))
    finally:
        if pg is not None:
            pg.stop()

    lines = ["| query | n | p50 ms | p95 ms | target p95 ms | met |", "|---|---|---|---|---|---|"]
    if results:
        table = Table(title=f"Search latency over HTTP — {args.patients:,} patients, {total:,} resources, "
                            f"{args.backend}")
        for col in ("query", "n", "p50 ms", "p95 ms", "target p95", "ok", "entries/page"):
            table.add_column(col)
        for r in results:
            target = COMPLEX_TARGET_MS if r["complex"] else SINGLE_TARGET_MS
            ok = r["p95"] <= target
            table.add_row(r["kind"], str(r["n"]), f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{target:.0f}",
                          "yes" if ok else "NO", f"{r['avg_entries']:.1f}")
            lines.append(f"| {r['kind']} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | {target:.0f} | "
                         f"{'yes' if ok else 'no'} |")
        console.print(table)
    if http is not None:
        w, wo, errs = http
        console.print(f"create throughput over HTTP ({args.connections} connections): {w:,.0f}/s with indexing, "
                      f"{wo:,.0f}/s without (ceiling) → [bold]{w / wo:.0%}[/] (target >= 50%), {errs} errors")
    for conc, (with_idx, without) in creates.items():
        ratio = with_idx / without if without else float("nan")
        console.print(f"create throughput in-process, {conc} writer(s): {with_idx:,.0f}/s with indexing, "
                      f"{without:,.0f}/s without (ceiling) → [bold]{ratio:.0%}[/] (target >= 50%)")
    if results:
        console.print(f"load rate: {total / secs:,.0f} resources/s ({total:,} in {secs:.0f}s, "
                      f"{args.batch}-resource transactions, {args.workers} concurrent)")
        print("\n".join(lines))
    if http is not None:
        print(f"create over HTTP: with indexing {http[0]:.0f}/s, without {http[1]:.0f}/s, "
              f"ratio {http[0] / http[1]:.2f}, errors {http[2]}")
    for conc, (with_idx, without) in creates.items():
        print(f"create in-process, {conc} writer(s): with indexing {with_idx:.0f}/s, without {without:.0f}/s, "
              f"ratio {with_idx / without:.2f}")


if __name__ == "__main__":
    main()
