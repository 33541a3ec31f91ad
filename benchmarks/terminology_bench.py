"""Terminology figures (issue 4), each printed next to a ceiling measured in the same run.

    python benchmarks/terminology_bench.py [--http/--no-http] [--rounds N]

In-process:
  * first expansion after start-up: a fresh registry + engine, then the first full $expand of mahalla-vs and of
    position-and-profession-vs (reads the CodeSystem from disk, builds the index, expands, renders);
  * full expansion (index built): recompute the expansion and render all codes; and the cached path;
    ceiling: one list comprehension building the same {system, code, display} dicts from the raw JSON;
  * validate_code calls/s, warm (distinct mahalla codes against mahalla-vs, cycled);
    ceiling: a function doing one dict lookup with the same arguments;
  * type-ahead in-process (distinct queries, filter + page of 20).
Over HTTP (uvicorn + dhp.api.create_app on loopback, SQLite in a temp folder, auth off):
  * type-ahead page of 20 (GET ValueSet/$expand?url=…&filter=…&count=20) with distinct queries in uz/ru/en,
    p50/p95, against GET /healthz (the empty endpoint) measured interleaved in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

CORE = "https://terminology.dhp.uz/fhir/core/"
MAHALLA_VS = CORE + "ValueSet/mahalla-vs"
POSITION_VS = CORE + "ValueSet/position-and-profession-vs"
MAHALLA_CS = CORE + "CodeSystem/mahalla-cs"
POSITION_CS = CORE + "CodeSystem/position-and-profession-cs"


def ms(s: float) -> str:
    return f"{s * 1000:.2f} ms"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def queries(registry: Any, url: str, n: int, seed: int) -> list[str]:
    """Distinct type-ahead queries: 3–6 letter starts of real words of every designation (uz, ru, en)."""
    from dhp.terminology.text import words

    cs = registry.resolve(url, "CodeSystem")
    rnd = random.Random(seed)
    vocab: set[str] = set()
    for c in cs["concept"]:
        for t in (c.get("display", ""), *(d["value"] for d in c.get("designation", []))):
            vocab.update(w for w in words(t) if len(w) >= 4 and not w.isdigit())
    out: set[str] = set()
    pool = sorted(vocab)
    while len(out) < n:
        w = rnd.choice(pool)
        out.add(w[: rnd.randint(3, min(6, len(w)))])
    return sorted(out, key=lambda _: rnd.random())


def in_process(rounds: int) -> dict[str, Any]:
    from dhp.conformance import load_registry
    from dhp.settings import Settings
    from dhp.terminology import RenderOptions, Terminology

    res: dict[str, Any] = {}
    settings = Settings.from_env()
    big = RenderOptions(max_expansion=1_000_000)

    print("== first expansion after start-up (fresh registry + engine; CodeSystem read from disk)")
    for vs in (MAHALLA_VS, POSITION_VS):
        registry = load_registry(settings)
        term = Terminology(registry)
        t0 = time.perf_counter()
        out = term.expand(vs, big)
        dt = time.perf_counter() - t0
        res[f"first:{vs}"] = dt
        print(f"  {vs.rsplit('/', 1)[1]:<30} {out['expansion']['total']:>6} codes  {ms(dt)}  (target ≤ 500 ms)")

    registry = load_registry(settings)
    term = Terminology(registry)
    print("== full expansion in-process (index built), median / p95 of", rounds, "runs")
    for vs, cs_url in ((MAHALLA_VS, MAHALLA_CS), (POSITION_VS, POSITION_CS)):
        term.expand(vs, big)
        recompute: list[float] = []
        cached: list[float] = []
        for _ in range(rounds):
            term._exp.clear()
            t0 = time.perf_counter()
            term.expand(vs, big)
            recompute.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            term.expand(vs, big)
            cached.append(time.perf_counter() - t0)
        raw = registry.resolve(cs_url, "CodeSystem")["concept"]
        ceiling: list[float] = []
        for _ in range(rounds):
            gc.disable()
            t0 = time.perf_counter()
            _ = [{"system": cs_url, "code": c["code"], "display": c["display"]} for c in raw]
            ceiling.append(time.perf_counter() - t0)
            gc.enable()
        name = vs.rsplit("/", 1)[1]
        res[f"full:{vs}"] = statistics.median(recompute)
        res[f"cached:{vs}"] = statistics.median(cached)
        print(f"  {name:<30} compute+render {ms(statistics.median(recompute))} (p95 {ms(pct(recompute, 95))})"
              f" | cached expansion, render only {ms(statistics.median(cached))}"
              f" | ceiling (bare list of dicts) {ms(statistics.median(ceiling))}"
              f" → {statistics.median(recompute) / statistics.median(ceiling):.1f}× ceiling  (target ≤ 50 ms)")

    print("== validate_code, warm")
    codes = [c["code"] for c in registry.resolve(MAHALLA_CS, "CodeSystem")["concept"][:2000]]
    for c in codes:
        term.validate_code(MAHALLA_CS, c, MAHALLA_VS)
    n = 500_000
    seq = [codes[i % len(codes)] for i in range(n)]
    vc = term.validate_code
    t0 = time.perf_counter()
    for c in seq:
        vc(MAHALLA_CS, c, MAHALLA_VS)
    dt = time.perf_counter() - t0
    table = {(MAHALLA_VS, MAHALLA_CS, c, None, None): True for c in codes}

    def bare(system: str | None, code: str, valueset: str | None = None, *, display: str | None = None,
             version: str | None = None) -> Any:
        return table.get((valueset, system, code, display, version))

    t0 = time.perf_counter()
    for c in seq:
        bare(MAHALLA_CS, c, MAHALLA_VS)
    ceil = time.perf_counter() - t0
    res["validate_per_s"] = n / dt
    print(f"  {n / dt:,.0f} calls/s  | ceiling (one dict lookup behind the same signature) {n / ceil:,.0f} calls/s"
          f" → {(n / dt) / (n / ceil):.2f} of ceiling  (target ≥ 100,000)")
    term.clear()
    t0 = time.perf_counter()
    first = term.validate_code(MAHALLA_CS, codes[0], MAHALLA_VS)
    print(f"  first validate_code after clear (builds index + expansion): {ms(time.perf_counter() - t0)}"
          f" result={first.result}")

    print("== type-ahead in-process (distinct queries, page of 20)")
    for vs, cs_url in ((MAHALLA_VS, MAHALLA_CS), (POSITION_VS, POSITION_CS)):
        qs = queries(registry, cs_url, 400, 7)
        t0 = time.perf_counter()
        term.expand(vs, RenderOptions(text_filter="zz", count=20))
        build = time.perf_counter() - t0
        times = []
        for q in qs:
            t0 = time.perf_counter()
            term.expand(vs, RenderOptions(text_filter=q, count=20, langs=("ru",)))
            times.append(time.perf_counter() - t0)
        print(f"  {vs.rsplit('/', 1)[1]:<30} first filter (builds word index) {ms(build)}; then p50 "
              f"{ms(pct(times, 50))} p95 {ms(pct(times, 95))} over {len(qs)} queries")
        res[f"typeahead_inproc_p95:{vs}"] = pct(times, 95)
    return res


def over_http(rounds: int, nq: int) -> dict[str, Any] | None:
    try:
        import httpx
        import uvicorn

        from dhp.api import create_app
        from dhp.conformance import load_registry
        from dhp.settings import Settings
    except ImportError as e:
        print(f"== HTTP figures skipped: {e}")
        return None
    tmp = tempfile.mkdtemp(prefix="dhp-bench-")
    env = {**os.environ, "DHP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/bench.db", "DHP_AUTH": "off"}
    settings = Settings.from_env(env)
    app = create_app(settings)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    uv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    th = threading.Thread(target=lambda: asyncio.run(uv.serve()), daemon=True)
    t0 = time.perf_counter()
    th.start()
    while not uv.started:
        if not th.is_alive():
            print("== HTTP figures skipped: the server did not start")
            return None
        time.sleep(0.05)
    print(f"== over HTTP (uvicorn on 127.0.0.1:{port}; server start-up incl. package install "
          f"{time.perf_counter() - t0:.1f} s)")
    res: dict[str, Any] = {}
    registry = load_registry(settings)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, headers={"Accept": "application/fhir+json"}, timeout=60) as c:
        t0 = time.perf_counter()
        r = c.get("/fhir/ValueSet/$expand", params={"url": MAHALLA_VS})
        first = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        print(f"  first full $expand of mahalla-vs after start-up: {ms(first)} "
              f"({len(r.content) / 1e6:.1f} MB JSON, {r.json()['expansion']['total']} codes)")
        res["http_first_full"] = first
        full = []
        for _ in range(max(3, rounds // 4)):
            t0 = time.perf_counter()
            c.get("/fhir/ValueSet/$expand", params={"url": MAHALLA_VS})
            full.append(time.perf_counter() - t0)
        print(f"  full $expand of mahalla-vs, warm: median {ms(statistics.median(full))}")
        for vs, cs_url, lang in ((MAHALLA_VS, MAHALLA_CS, "uz"), (POSITION_VS, POSITION_CS, "ru")):
            c.get("/fhir/ValueSet/$expand", params={"url": vs, "filter": "zz", "count": 20})  # word index
            qs = queries(registry, cs_url, nq, 11)
            for _ in range(50):
                c.get("/healthz")
            ta: list[float] = []
            empty: list[float] = []
            for q in qs:
                t0 = time.perf_counter()
                r = c.get("/fhir/ValueSet/$expand", params={"url": vs, "filter": q, "count": 20,
                                                             "displayLanguage": lang})
                ta.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                t0 = time.perf_counter()
                c.get("/healthz")
                empty.append(time.perf_counter() - t0)
            p95, e95 = pct(ta, 95), pct(empty, 95)
            name = vs.rsplit("/", 1)[1]
            res[f"http_typeahead_p95:{vs}"] = p95
            res[f"http_empty_p95:{vs}"] = e95
            print(f"  type-ahead {name:<27} p50 {ms(pct(ta, 50))} p95 {ms(p95)} | empty endpoint p50 "
                  f"{ms(pct(empty, 50))} p95 {ms(e95)} | minus empty: p95 {ms(p95 - e95)}, p50 "
                  f"{ms(pct(ta, 50) - pct(empty, 50))}  (target p95 ≤ 5 ms)  [{len(qs)} distinct queries]")
    uv.should_exit = True
    th.join(timeout=30)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--http", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--queries", type=int, default=1000, help="distinct type-ahead queries per value set (HTTP)")
    ap.add_argument("--http-only", action="store_true")
    a = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    if not a.http_only:
        in_process(a.rounds)
    if a.http or a.http_only:
        over_http(a.rounds, a.queries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
