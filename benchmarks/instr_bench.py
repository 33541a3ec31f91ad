"""Instructions per request of read / create / update against the empty endpoint, counted by valgrind.

Requests/s on this VM swing 2–3x between runs of the same code, so a change worth 3 % cannot be seen in
``rest_bench.py``. Instruction counts do not swing: this script runs the app in-process under callgrind (the
ASGI app driven directly, 16 requests in flight, no HTTP server: its parsing costs every request alike) and
counts the instructions of each kind of request, from warm-up to the end of the measured batch only.
Counts are of the process: on PostgreSQL the database server's own work is not in them (``rest_bench.py``
reports it as CPU time). Needs ``valgrind`` (Debian package); a run takes a few minutes.

    python benchmarks/instr_bench.py [--backend sqlite|pg] [--requests 480]

Under valgrind the app runs ~50x slower, so anything on a timer runs ~50x as often per request. The check
for conformance resources other processes wrote (``DHP_CONFORMANCE_POLL``, 1 s) is set to 60 s here, about
as often per request as at full speed; the SQLite WAL checkpoint (every 0.5 s) copies what was written, so
more frequent checkpoints copy less each and are left as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KINDS = ("empty", "read", "create", "update")
IN_FLIGHT = 16


def _control(*args: str) -> None:
    """callgrind_control talks to the running valgrind through files it polls: give it a moment."""
    subprocess.run(["callgrind_control", *args, str(os.getpid())], capture_output=True, check=False)
    time.sleep(0.5)


async def _drive(n: int) -> None:
    from rest_bench import PATIENT

    from dhp.api.app import create_app, settle_heap

    app = create_app()
    lifespan = app.app.router.lifespan_context(app.app)
    await lifespan.__aenter__()
    settle_heap()  # as a server process does after start-up
    statuses: dict[str, set[int]] = {k: set() for k in KINDS}

    async def call(kind: str, method: str, path: str, body: bytes = b"") -> bytes:
        headers = [(b"host", b"127.0.0.1"), (b"accept", b"application/fhir+json")]
        if body:
            headers += [(b"content-type", b"application/fhir+json"), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.setdefault(kind, set()).add(message["status"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app(scope, receive, send)
        return b"".join(chunks)

    body = json.dumps(PATIENT).encode()
    ids = [json.loads(await call("create", "POST", "/fhir/Patient", body))["id"] for _ in range(64)]
    counter = 0

    def request(kind: str) -> tuple[str, str, bytes]:
        nonlocal counter
        counter += 1
        rid = ids[counter % len(ids)]
        if kind == "empty":
            return "GET", "/healthz", b""
        if kind == "read":
            return "GET", f"/fhir/Patient/{rid}", b""
        if kind == "create":
            return "POST", "/fhir/Patient", body
        changed = {**PATIENT, "id": rid, "telecom": [{"system": "phone", "value": f"+99890{1000000 + counter}"}]}
        return "PUT", f"/fhir/Patient/{rid}", json.dumps(changed).encode()

    async def run(kind: str, todo: list[tuple[str, str, bytes]]) -> None:
        async def worker() -> None:
            while todo:
                await call(kind, *todo.pop())

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))

    for kind in KINDS:
        await run(kind, [request(kind) for _ in range(4 * IN_FLIGHT)])  # warm: statements, caches, pools
        statuses[kind].clear()
        todo = [request(kind) for _ in range(n)]  # bodies are built before the counting starts
        _control("--zero")
        _control("--instr=on")
        await run(kind, todo)
        _control("--instr=off")
        _control(f"--dump={kind}")
        bad = statuses[kind] - {200, 201}
        if bad:
            raise SystemExit(f"{kind}: unexpected statuses {sorted(bad)}")
    await lifespan.__aexit__(None, None, None)


def _totals(out: Path) -> dict[str, int]:
    """Instruction totals per dump, by the kind named in the dump's trigger."""
    got: dict[str, int] = {}
    for f in sorted(out.parent.glob(out.name + "*")):
        text = f.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\S+)", text, re.M)
        kind = trigger.group(1) if trigger and trigger.group(1) in KINDS else None
        total = re.search(r"^totals: (\d+)", text, re.M)  # the "summary:" line of a dump reads 0
        if kind and total:
            got[kind] = int(total.group(1))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "pg"], default="sqlite")
    ap.add_argument("--requests", type=int, default=480, help="measured requests per kind")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.requests - args.requests % IN_FLIGHT
    if args.child:  # under valgrind
        asyncio.run(_drive(n))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    tmp = Path(tempfile.mkdtemp(prefix="dhp-bench-"))
    pg = None
    try:
        if args.backend == "pg":
            from tests.pgserver import PgServer

            pg = PgServer()
            pg.start()
            url = pg.create_db("instr_bench")
        else:
            url = f"sqlite+aiosqlite:///{tmp / 'instr.db'}"
        env = {**os.environ, "DHP_DATABASE_URL": url, "DHP_AUTH": "off", "DHP_VALIDATION": "off",
               "DHP_LOG_LEVEL": "warning", "DHP_CONFORMANCE_POLL": "60"}
        out = tmp / "callgrind.out"
        t0 = time.perf_counter()
        # The interpreter itself, not a shim script that would exec it out of valgrind's sight.
        python = os.path.realpath(sys.executable)
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                               python, __file__, "--child", "yes", "--requests", str(n)], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"valgrind run failed:\n{proc.stderr[-3000:]}")
        totals = _totals(out)
        missing = [k for k in KINDS if k not in totals]
        if missing:
            raise SystemExit(f"no counts for {missing}; files: {[p.name for p in tmp.iterdir()]}")
    finally:
        if pg is not None:
            pg.stop()
    per = {k: totals[k] / n for k in KINDS}
    print(f"### instructions per request, {args.backend}, {n} requests per kind, {IN_FLIGHT} in flight "
          f"(run took {time.perf_counter() - t0:.0f} s)\n")
    print("| request | instructions | ratio (empty / this) |")
    print("|---|---|---|")
    for k in KINDS:
        print(f"| {k} | {per[k]:,.0f} | {per['empty'] / per[k]:.3f} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
