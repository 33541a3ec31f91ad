"""SSO figures: the cost of token verification on a FHIR read, and the client_credentials issue rate.

Two real DHP servers (uvicorn, one process each) share one SQLite database: one with ``DHP_AUTH=off`` (the
ceiling) and one with ``DHP_AUTH=on``. The same load generator — a minimal keep-alive HTTP/1.1 client on raw
asyncio streams, so the client is not the bottleneck — reads the same Patient from each, in alternating
one-second slices, so both see the same background load; the ratio of the totals is the figure. Then it asks the auth server for client_credentials tokens and
compares with a trivial endpoint of the same server (the JWKS document) as that measurement's ceiling.

    python benchmarks/auth_bench.py [--seconds 1] [--concurrency 16] [--rounds 8] [--backend sqlite|pg]

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


def start(db_url: str, auth: str, log: Path, *, workers: int = 1,
          extra: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "DHP_DATABASE_URL": db_url, "DHP_AUTH": auth, "DHP_VALIDATION": "off",
           "DHP_PACKAGE_IMPORT": "none", "DHP_LOG_LEVEL": "warning", **(extra or {})}
    p = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "dhp.api:create_app", "--host", "127.0.0.1",
                          "--port", str(port), "--log-level", "warning", "--no-access-log",
                          "--workers", str(workers)], env=env,
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
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one measured slice")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8, help="alternating slices per measurement")
    ap.add_argument("--backend", choices=["sqlite", "pg"], default="sqlite",
                    help="pg: start a PostgreSQL of its own (tests/pgserver.py) on this machine")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dhp-auth-bench-"))
    pg = None
    if args.backend == "pg":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pgserver import PgServer

        pg = PgServer()
        pg.start()
        db_url = pg.create_db("authbench").replace("postgresql://", "postgresql+asyncpg://", 1)
    else:
        db_url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    print(f"auth benchmark: {args.rounds} alternating slices of {args.seconds}s, concurrency {args.concurrency}, "
          f"{'PostgreSQL' if pg else 'SQLite'}, {os.cpu_count()} CPUs")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        on, on_port = start(db_url, "on", tmp / "on.log")
        procs.append(on)
        admin = {"client_id": "dhp-admin", "client_secret": _admin_secret(db_url)}
        tok = post_form(on_port, "/oauth/token", {"grant_type": "client_credentials", **admin})["access_token"]
        pid = post_json(on_port, "/fhir/Patient", {"resourceType": "Patient", "active": True,
                                                    "name": [{"family": "Bench"}]},
                        {"Authorization": f"Bearer {tok}"})["id"]
        reader = post_json(on_port, "/admin/clients", {"name": "bench reader", "scopes": "system/Patient.rs"},
                           {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
        read_tok = post_form(on_port, "/oauth/token", {"grant_type": "client_credentials", **reader})["access_token"]
        off, off_port = start(db_url, "off", tmp / "off.log")
        procs.append(off)

        # 1. Reads: the same Patient from both servers, in alternating slices (the order flips every round) so
        #    both see the same background load; the ratio of the totals is the figure.
        plain = http_get(f"/fhir/Patient/{pid}", off_port)
        authed = http_get(f"/fhir/Patient/{pid}", on_port, read_tok)
        n_off = n_on = 0.0
        best_off = best_on = 0.0
        for r in range(args.rounds):
            order = [("off", off_port, plain), ("on", on_port, authed)]
            for name, port, req in (order if r % 2 == 0 else order[::-1]):
                rate, st = load(port, req, args.seconds, args.concurrency)
                assert set(st) == {200}, (name, st)
                if name == "off":
                    n_off += rate
                    best_off = max(best_off, rate)
                else:
                    n_on += rate
                    best_on = max(best_on, rate)
        ratio = n_on / n_off
        print(f"FHIR read, DHP_AUTH=off (ceiling):  mean {n_off / args.rounds:7.0f} /s   best {best_off:7.0f} /s")
        print(f"FHIR read, Bearer JWT verified:     mean {n_on / args.rounds:7.0f} /s   best {best_on:7.0f} /s")
        print(f"  authenticated / unauthenticated = {ratio:.1%} (best/best {best_on / best_off:.1%}); "
              f"target >= 85% {'OK' if ratio >= 0.85 else 'BELOW TARGET'}")
        off.terminate()
        off.wait(30)
        procs.remove(off)

        # 2. Token issue, against the same server's trivial endpoint as the ceiling.
        issue_req = http_post_form("/oauth/token", on_port, {"grant_type": "client_credentials", **reader})
        rate_i, rate_j = _alternate(on_port, issue_req, http_get("/oauth/jwks", on_port), args)
        print(f"trivial endpoint (GET /oauth/jwks, ceiling):   {rate_j:7.0f} /s")
        print(f"client_credentials token issue, RS256, 1 proc:  {rate_i:7.0f} /s   = {rate_i / rate_j:.1%} of the "
              f"ceiling; target >= 500/s {'OK' if rate_i >= 500 else 'BELOW TARGET'}")
        sign = _sign_rate()
        print(f"  ceiling of the signature alone (RS256 sign in this process): {sign['RS256']:7.0f} /s; "
              f"ES256: {sign['ES256']:7.0f} /s")
        on.terminate()
        on.wait(30)
        procs.remove(on)

        # 3. The same with two worker processes (stateless: keys and revocations come from the database).
        multi, m_port = start(db_url, "on", tmp / "multi.log", workers=2)
        procs.append(multi)
        issue_req = http_post_form("/oauth/token", m_port, {"grant_type": "client_credentials", **reader})
        rate_m, rate_mj = _alternate(m_port, issue_req, http_get("/oauth/jwks", m_port), args)
        print(f"client_credentials token issue, RS256, 2 procs: {rate_m:7.0f} /s   (jwks ceiling {rate_mj:7.0f} /s)")
        multi.terminate()
        multi.wait(30)
        procs.remove(multi)

        # 3b. RS256 signed on the event loop (DHP_TOKEN_SIGNER=inline): what the signer process saves.
        inl, i_port = start(db_url, "on", tmp / "inline.log", extra={"DHP_TOKEN_SIGNER": "inline"})
        procs.append(inl)
        issue_req = http_post_form("/oauth/token", i_port, {"grant_type": "client_credentials", **reader})
        rate_in, rate_inj = _alternate(i_port, issue_req, http_get("/oauth/jwks", i_port), args)
        print(f"client_credentials token issue, RS256 signed on the event loop (DHP_TOKEN_SIGNER=inline), 1 proc: "
              f"{rate_in:7.0f} /s   (jwks ceiling {rate_inj:7.0f} /s)")
        inl.terminate()
        inl.wait(30)
        procs.remove(inl)

        # 4. ES256 (DHP_TOKEN_ALG=ES256), one process.
        es, es_port = start(db_url, "on", tmp / "es.log", extra={"DHP_TOKEN_ALG": "ES256"})
        procs.append(es)
        issue_req = http_post_form("/oauth/token", es_port, {"grant_type": "client_credentials", **reader})
        rate_e, rate_ej = _alternate(es_port, issue_req, http_get("/oauth/jwks", es_port), args)
        print(f"client_credentials token issue, ES256, 1 proc:  {rate_e:7.0f} /s   (jwks ceiling {rate_ej:7.0f} /s)")
        print(f"  (every issue: client authentication, scope grant, signature, one AuditEvent committed and "
              f"indexed; {_count_audit(db_url)} AuditEvents in the database)")
        es.terminate()
        es.wait(30)
        procs.remove(es)
        _in_process(db_url)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        if pg is not None:
            pg.stop()


def _in_process(db_url: str) -> None:
    """The same two paths without HTTP, to show where the time goes."""
    from starlette.requests import Request

    import dhp.auth as auth
    from dhp.api.app import build_server
    from dhp.auth.endpoints import Endpoints
    from dhp.settings import Settings

    async def go() -> None:
        settings = Settings.from_env({**os.environ, "DHP_DATABASE_URL": db_url, "DHP_PACKAGE_IMPORT": "none"})
        server = await build_server(settings)
        await auth.start(server)
        st = server.auth
        tok, _ = await st.issue_access_token(headers={"host": "h"}, client_id="c", sub="c", scope=["system/Patient.rs"],
                                       fhir_user=None, patient=None, grant_id=None)
        h = {"authorization": "Bearer " + tok, "host": "h"}
        await auth.authenticate(server, h)
        n = 20000
        t = time.perf_counter()
        for _ in range(n):
            p = await auth.authenticate(server, h)
            p.can("r", "Patient")
        cached = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        for _ in range(500):
            st.cache.clear()
            await auth.authenticate(server, h)
        fresh = (time.perf_counter() - t) / 500 * 1e6
        t = time.perf_counter()
        for _ in range(5000):
            await server.store.read("Patient", "none")
        read = (time.perf_counter() - t) / 5000 * 1e6
        print(f"in-process: authenticate + can(), token seen before: {cached:6.1f} us; first sight (RS256 verify): "
              f"{fresh:6.1f} us; store.read of one row: {read:6.1f} us")
        reader = _bench_client(server)
        e = Endpoints(server)
        c = await reader
        body = urllib.parse.urlencode({"grant_type": "client_credentials", **c}).encode()

        def request() -> Request:
            async def receive() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            return Request({"type": "http", "method": "POST", "path": "/oauth/token", "query_string": b"",
                            "headers": [(b"content-type", b"application/x-www-form-urlencoded"), (b"host", b"h")],
                            "client": ("127.0.0.1", 1)}, receive)

        async def worker(k: int) -> None:
            for _ in range(k):
                r = await e.token(request())
                assert r.status_code == 200

        await worker(20)
        rates = {}
        search = server.search
        for label, engine in (("AuditEvent committed + indexed", search), ("AuditEvent committed, not indexed",
                                                                           None)):
            server.search = engine
            t = time.perf_counter()
            await asyncio.gather(*[worker(40) for _ in range(16)])
            await st.audit.wait_indexed()
            rates[label] = 640 / (time.perf_counter() - t)
        server.search = search
        print("in-process: client_credentials handler, " + "; ".join(f"{k}: {v:5.0f} /s" for k, v in rates.items()))
        await auth.stop(server)
        await server.store.close()

    asyncio.run(go())


async def _bench_client(server: object) -> dict[str, str]:
    from dhp.auth.core import create_client

    return await create_client(server.store, name="in-process bench", scopes="system/Patient.rs")  # type: ignore[attr-defined]


def _alternate(port: int, a: bytes, b: bytes, args: argparse.Namespace) -> tuple[float, float]:
    """Mean rates of two request kinds measured in alternating slices."""
    ta = tb = 0.0
    for r in range(args.rounds):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            rate, st = load(port, (a, b)[which], args.seconds, args.concurrency)
            assert set(st) == {200}, st
            if which == 0:
                ta += rate
            else:
                tb += rate
    return ta / args.rounds, tb / args.rounds


def _sign_rate() -> dict[str, float]:
    from joserfc import jwt
    from joserfc.jwk import ECKey, RSAKey

    out = {}
    for alg, key in (("RS256", RSAKey.generate_key(2048, private=True)),
                     ("ES256", ECKey.generate_key("P-256", private=True))):
        t = time.perf_counter()
        n = 300
        for _ in range(n):
            jwt.encode({"alg": alg}, {"sub": "x", "exp": 1}, key)
        out[alg] = n / (time.perf_counter() - t)
    return out


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
