"""SSO figures: the cost of token verification on a FHIR read, and the client_credentials issue rate.

Two real DHP servers (uvicorn, one process each) share one SQLite database: one with ``DHP_AUTH=off`` (the
ceiling) and one with ``DHP_AUTH=on``. The same load generator — a minimal keep-alive HTTP/1.1 client on raw
asyncio streams, so the client is not the bottleneck — reads the same Patient from each, in alternating
rounds; the best round of each counts. Then it asks the auth server for client_credentials tokens and
compares with a trivial endpoint of the same server (the JWKS document) as that measurement's ceiling.

    python benchmarks/auth_bench.py [--seconds 5] [--concurrency 16] [--rounds 3]

Targets (issue 6): authenticated reads >= 85 % of unauthenticated; token issue >= 500/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(db_url: str, auth: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "DHP_DATABASE_URL": db_url, "DHP_AUTH": auth, "DHP_VALIDATION": "off",
           "DHP_PACKAGE_IMPORT": "none", "DHP_LOG_LEVEL": "warning"}
    p = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "dhp.api:create_app", "--host", "127.0.0.1",
                          "--port", str(port), "--log-level", "warning", "--no-access-log"], env=env,
                         stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            return p, port
        except OSError:
            if p.poll() is not None:
                raise RuntimeError(f"server exited; see {log}") from None
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("server did not start")


def post_form(port: int, path: str, data: dict[str, str], headers: dict[str, str] | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=urllib.parse.urlencode(data).encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def post_json(port: int, path: str, body: dict, headers: dict[str, str]) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/fhir+json", **headers})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


async def _one_conn(port: int, request: bytes, stop_at: float, counts: list[int], statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            statuses[status] = statuses.get(status, 0) + 1
            counts[0] += 1
    finally:
        writer.close()


async def _load(port: int, request: bytes, seconds: float, concurrency: int) -> tuple[float, dict[int, int]]:
    counts = [0]
    statuses: dict[int, int] = {}
    # Warm-up (connections, caches), not counted.
    await asyncio.gather(*[_one_conn(port, request, time.perf_counter() + 0.5, [0], {}) for _ in range(concurrency)])
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*[_one_conn(port, request, stop_at, counts, statuses) for _ in range(concurrency)])
    return counts[0] / (time.perf_counter() - t0), statuses


def load(port: int, request: bytes, seconds: float, concurrency: int) -> tuple[float, dict[int, int]]:
    return asyncio.run(_load(port, request, seconds, concurrency))


def http_get(path: str, port: int, token: str | None = None) -> bytes:
    h = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/fhir+json\r\n"
    if token:
        h += f"Authorization: Bearer {token}\r\n"
    return (h + "\r\n").encode()


def http_post_form(path: str, port: int, form: dict[str, str]) -> bytes:
    body = urllib.parse.urlencode(form).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dhp-auth-bench-"))
    db_url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    print(f"auth benchmark: {args.seconds}s x {args.rounds} rounds, concurrency {args.concurrency}, SQLite, "
          f"{os.cpu_count()} CPUs")
    on, on_port = start(db_url, "on", tmp / "on.log")
    off = None
    try:
        # The auth server creates the admin client on the empty database.
        admin = None
        for line in (tmp / "on.log").read_text().splitlines():
            if "client_secret" in line:
                break
        admin_secret = _admin_secret(db_url)
        admin = {"client_id": "dhp-admin", "client_secret": admin_secret}
        tok = post_form(on_port, "/oauth/token", {"grant_type": "client_credentials", **admin})["access_token"]
        pid = post_json(on_port, "/fhir/Patient", {"resourceType": "Patient", "active": True,
                                                    "name": [{"family": "Bench"}]},
                        {"Authorization": f"Bearer {tok}"})["id"]
        reader = post_json(on_port, "/admin/clients", {"name": "bench reader", "scopes": "system/Patient.rs"},
                           {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
        read_tok = post_form(on_port, "/oauth/token", {"grant_type": "client_credentials", **reader})["access_token"]
        off, off_port = start(db_url, "off", tmp / "off.log")

        best_off = best_on = 0.0
        for r in range(args.rounds):
            rate_off, st_off = load(off_port, http_get(f"/fhir/Patient/{pid}", off_port), args.seconds,
                                    args.concurrency)
            rate_on, st_on = load(on_port, http_get(f"/fhir/Patient/{pid}", on_port, read_tok), args.seconds,
                                  args.concurrency)
            assert set(st_off) == {200} and set(st_on) == {200}, (st_off, st_on)
            print(f"  round {r + 1}: unauthenticated {rate_off:8.0f} reads/s   authenticated {rate_on:8.0f} reads/s")
            best_off, best_on = max(best_off, rate_off), max(best_on, rate_on)
        ratio = best_on / best_off
        print(f"FHIR read, unauthenticated (ceiling): {best_off:8.0f} /s")
        print(f"FHIR read, Bearer JWT verified:       {best_on:8.0f} /s   = {ratio:.1%} of the ceiling "
              f"(target >= 85%) {'OK' if ratio >= 0.85 else 'BELOW TARGET'}")
        off.terminate()
        off.wait(30)
        off = None

        issue_req = http_post_form("/oauth/token", on_port, {"grant_type": "client_credentials", **reader})
        jwks_req = http_get("/oauth/jwks", on_port)
        best_issue = best_jwks = 0.0
        for _ in range(args.rounds):
            rate_j, st_j = load(on_port, jwks_req, args.seconds, args.concurrency)
            rate_i, st_i = load(on_port, issue_req, args.seconds, args.concurrency)
            assert set(st_i) == {200} and set(st_j) == {200}, (st_i, st_j)
            best_issue, best_jwks = max(best_issue, rate_i), max(best_jwks, rate_j)
        print(f"trivial endpoint (GET /oauth/jwks, ceiling): {best_jwks:8.0f} /s")
        print(f"client_credentials token issue:              {best_issue:8.0f} /s   = {best_issue / best_jwks:.1%} "
              f"of the ceiling (target >= 500/s) {'OK' if best_issue >= 500 else 'BELOW TARGET'}")
        print(f"  (each issue: client lookup, RS256 signature, one AuditEvent committed; "
              f"{_count_audit(db_url)} AuditEvents in the database)")
    finally:
        for p in (on, off):
            if p is not None:
                p.terminate()
                p.wait(30)


def _admin_secret(db_url: str) -> str:
    """The admin client's secret is printed only once; the benchmark makes its own by rotating it."""
    from dhp.auth.core import rotate_client_secret
    from dhp.store import Store

    async def go() -> str:
        s = Store(db_url)
        await s.open(migrate=False)
        try:
            secret = await rotate_client_secret(s, "dhp-admin")
        finally:
            await s.close()
        assert secret
        return secret

    return asyncio.run(go())


def _count_audit(db_url: str) -> int:
    from dhp.store import Store

    async def go() -> int:
        s = Store(db_url)
        await s.open(migrate=False)
        try:
            return await s.count("AuditEvent")
        finally:
            await s.close()

    return asyncio.run(go())


if __name__ == "__main__":
    main()
