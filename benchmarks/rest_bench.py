"""REST throughput and latency of read / create / update against a ceiling measured in the same run.

The ceiling is an empty endpoint (``/healthz``: a tiny JSON response) on the same server process and stack
(Starlette + uvicorn with uvloop/httptools, one worker). Load comes from ``wrk`` (Debian package) on the same
machine, so client cost is in both numbers alike. The ceiling is measured right before and right after each
interaction's run, and that interaction's ratio is to the mean of those two: this VM's speed drifts by 10–20 %
within a minute, and a ceiling taken a minute away carried that drift into the ratio.

    python benchmarks/rest_bench.py [--backend sqlite|pg|both] [--duration 10] [--connections 32]

Prints absolute requests/s, p50/p99 latency, errors and the ratio to the ceiling, plus start-up time, and
the CPU each request cost the server process and (PostgreSQL) the database server: where the time goes, in
numbers that a busy machine distorts less than requests/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgserver import PgServer, free_port  # noqa: E402

PATIENT = {"resourceType": "Patient", "active": True,
           "identifier": [{"system": "https://dpm.uz/identifier/national-unique-id", "value": "31234567890123"}],
           "name": [{"family": "Karimov", "given": ["Aziz"]}], "gender": "male", "birthDate": "1990-05-17",
           "address": [{"use": "home", "state": "1727", "district": "1727220", "city": "17150085", "country": "UZ"}]}

TARGETS = {"read": 0.35, "create": 0.20, "update": 0.20}


def start_server(db_url: str, port: int, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], float]:
    env = {**os.environ, "DHP_DATABASE_URL": db_url, "DHP_AUTH": "off", "DHP_VALIDATION": "off",
           "DHP_LOG_LEVEL": "warning", **(extra_env or {})}
    t0 = time.perf_counter()
    # The server's log goes to a file: a pipe nobody reads fills up, and the server then blocks on its next
    # log line (every request times out).
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "dhp.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            raise RuntimeError(f"server failed to start: {log.read().decode(errors='replace')}")
        time.sleep(0.05)
    return proc, time.perf_counter() - t0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


_LUA_READ = """
local ids = {%s}
request = function()
  return wrk.format("GET", "/fhir/Patient/" .. ids[math.random(#ids)], {["Accept"]="application/fhir+json"})
end
"""
_LUA_CREATE = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/fhir+json"
"""
# Each update changes the patient's phone number (a new random one), so every PUT changes index rows.
_LUA_UPDATE = """
local ids = {%s}
local pre = [[%s]]
local mid = [[%s]]
local post = [[%s]]
request = function()
  local id = ids[math.random(#ids)]
  local phone = "+99890" .. math.random(1000000, 9999999)
  return wrk.format("PUT", "/fhir/Patient/" .. id, {["Content-Type"]="application/fhir+json"},
                    pre .. id .. mid .. phone .. post)
end
"""


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU time (user + system) used so far by process ``pid``; ``children``: also by its live children and
    the ones it has reaped (PostgreSQL's backends are the postmaster's children)."""
    ticks = os.sysconf("SC_CLK_TCK")

    def stat(p: int) -> list[str]:
        # Fields after the command name, which may contain spaces: state is [0], utime [11], cutime [13].
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    try:
        st = stat(pid)
    except OSError:
        return 0.0
    total = int(st[11]) + int(st[12])
    if children:
        total += int(st[13]) + int(st[14])
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cst = stat(int(entry))
                except OSError:
                    continue
                if int(cst[1]) == pid:
                    total += int(cst[11]) + int(cst[12])
    return total / ticks


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(url: str, script: str | None, duration: int, connections: int) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    tmp = None
    if script:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        tmp.write(script)
        tmp.close()
        args += ["-s", tmp.name]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    if tmp:
        os.unlink(tmp.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s*50%[ \t]+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%[ \t]+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors, "requests": total}


def measured(url: str, script: str | None, duration: int, connections: int, server_pid: int,
             db_pid: int | None) -> dict[str, float]:
    """A wrk run, plus the server's (and the database server's) CPU per request over it."""
    s0, d0 = cpu_seconds(server_pid), cpu_seconds(db_pid, children=True) if db_pid else 0.0
    r = wrk(url, script, duration, connections)
    s1, d1 = cpu_seconds(server_pid), cpu_seconds(db_pid, children=True) if db_pid else 0.0
    n = max(r["requests"], 1)
    r["server_cpu_us"] = (s1 - s0) / n * 1e6
    r["db_cpu_us"] = (d1 - d0) / n * 1e6 if db_pid else float("nan")
    return r


def run_backend(backend: str, duration: int, connections: int) -> dict[str, object]:
    pg = None
    tmpdir = Path(tempfile.mkdtemp(prefix="dhp-bench-"))
    try:
        if backend == "pg":
            pg = PgServer()
            pg.start()
            db_url = pg.create_db("bench")
        else:
            db_url = f"sqlite+aiosqlite:///{tmpdir / 'bench.db'}"
        port = free_port()
        # First start builds the database (migrations, package install); the second is the warm start-up.
        proc, first = start_server(db_url, port)
        stop(proc)
        proc, warm = start_server(db_url, port)
        base = f"http://127.0.0.1:{port}"
        db_pid = int((pg.dir / "data" / "postmaster.pid").read_text().split()[0]) if pg else None

        def run(url: str, script: str | None) -> dict[str, float]:
            return measured(url, script, duration, connections, proc.pid, db_pid)

        try:
            ids = []
            with httpx.Client(base_url=base + "/fhir", headers={"Content-Type": "application/fhir+json"}) as c:
                for _ in range(500):
                    r = c.post("/Patient", content=json.dumps(PATIENT))
                    r.raise_for_status()
                    ids.append(r.json()["id"])
            id_list = ",".join(f'"{i}"' for i in ids)
            results: dict[str, dict[str, float]] = {}
            wrk(base + "/healthz", None, 2, connections)  # warm-up
            upd = json.dumps({**PATIENT, "id": "@@ID@@", "telecom": [{"system": "phone", "value": "@@PHONE@@"}]})
            pre, rest = upd.split("@@ID@@")
            mid, post = rest.split("@@PHONE@@")
            loads = {"read": (base, _LUA_READ % id_list),
                     "create": (base + "/fhir/Patient", _LUA_CREATE % json.dumps(PATIENT)),
                     "update": (base, _LUA_UPDATE % (id_list, pre, mid, post))}
            # ceiling 0, read, ceiling 1, create, ceiling 2, update, ceiling 3: each interaction between two.
            results["ceiling 0"] = run(base + "/healthz", None)
            for i, (kind, (url, script)) in enumerate(loads.items()):
                results[kind] = run(url, script)
                results[f"ceiling {i + 1}"] = run(base + "/healthz", None)
        finally:
            stop(proc)
        return {"backend": backend, "first_start_s": first, "warm_start_s": warm, "results": results}
    finally:
        if pg:
            pg.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


def report(run: dict[str, object]) -> str:
    res: dict[str, dict[str, float]] = run["results"]  # type: ignore[assignment]
    ceilings = [res[f"ceiling {i}"] for i in range(4)]
    overall = sum(c["rps"] for c in ceilings) / 4
    each = " / ".join(f"{c['rps']:,.0f}" for c in ceilings)
    lines = [f"### {run['backend']}",
             f"start-up: first run {run['first_start_s']:.1f} s (migrations + package install), "
             f"warm {run['warm_start_s']:.1f} s", "",
             "| interaction | req/s | p50 ms | p99 ms | errors | ceiling req/s (before / after) | ratio to ceiling "
             "| target | server CPU µs/req | database CPU µs/req |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| empty endpoint (ceiling, mean of its 4 runs) | {overall:,.0f} | "
             f"{_mean(ceilings, 'p50_ms'):.2f} | {_mean(ceilings, 'p99_ms'):.2f} | "
             f"{sum(c['errors'] for c in ceilings):.0f} | {each} | 1.00 | | "
             f"{_us(_mean(ceilings, 'server_cpu_us'))} | {_us(_mean(ceilings, 'db_cpu_us'))} |"]
    for i, k in enumerate(("read", "create", "update")):
        r = res[k]
        before, after = ceilings[i]["rps"], ceilings[i + 1]["rps"]
        ratio = r["rps"] / ((before + after) / 2)
        ok = "met" if ratio >= TARGETS[k] and r["errors"] == 0 else "NOT met"
        lines.append(f"| {k} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} | "
                     f"{before:,.0f} / {after:,.0f} | {ratio:.2f} | ≥ {TARGETS[k]:.2f} ({ok}) | "
                     f"{_us(r.get('server_cpu_us', float('nan')))} | {_us(r.get('db_cpu_us', float('nan')))} |")
    return "\n".join(lines)


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r.get(key, float("nan")) for r in rows) / len(rows)


def _us(v: float) -> str:
    return "—" if v != v else f"{v:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "pg", "both"], default="both")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    backends = ["sqlite", "pg"] if args.backend == "both" else [args.backend]
    for b in backends:
        print(report(run_backend(b, args.duration, args.connections)), flush=True)
        print()


if __name__ == "__main__":
    main()
