"""A server process settles its heap once start-up is done; apps built by tests (many per process) do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.pgserver import free_port
from tests.serving import wait_serving

_PROBE = textwrap.dedent("""
    import asyncio, gc, sys
    from dhp.api.app import GC_THRESHOLD, create_app
    from dhp.settings import Settings

    async def lifespan(app):
        events = [{"type": "lifespan.startup"}]
        sent = []
        async def receive():
            return events.pop(0) if events else await asyncio.Event().wait()
        async def send(msg):
            sent.append(msg["type"])
        task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       receive, send))
        while not sent:
            await asyncio.sleep(0.05)
        assert sent == ["lifespan.startup.complete"], sent
        out = (gc.get_freeze_count(), gc.get_threshold())
        task.cancel()
        return out

    own = sys.argv[1] == "own"
    app = create_app(Settings.from_env(), own_process=own)
    frozen, threshold = asyncio.run(lifespan(app))
    print(frozen, threshold[0], GC_THRESHOLD[0])
""")


def _probe(tmp_path: Path, mode: str) -> tuple[int, int, int]:
    env = {**os.environ, "DHP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / mode}.db", "DHP_AUTH": "off",
           "DHP_PACKAGE_IMPORT": "none", "DHP_LOG_LEVEL": "warning"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    frozen, threshold, wanted = map(int, out.stdout.split()[-3:])
    return frozen, threshold, wanted


def test_server_process_freezes_start_up_objects(tmp_path: Path) -> None:
    frozen, threshold, wanted = _probe(tmp_path, "own")
    # the packages' definitions alone are tens of thousands of objects
    assert frozen > 10_000
    assert threshold == wanted != 700


def test_app_built_in_a_shared_process_leaves_the_collector_alone(tmp_path: Path) -> None:
    frozen, threshold, _ = _probe(tmp_path, "shared")
    assert frozen == 0
    assert threshold == 700


def test_serve_with_several_workers(tmp_path: Path) -> None:
    """`dhp serve --workers 2`: each worker builds its app with the process factory and serves."""
    port = free_port()
    env = {**os.environ, "DHP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'dhp.db'}", "DHP_AUTH": "off",
           "DHP_PACKAGE_IMPORT": "none", "DHP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "dhp.cli", "serve", "--port", str(port), "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(proc, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/fhir", timeout=30) as c:
            ids = []
            for i in range(20):  # a new connection each: either worker may answer; both write one database
                r = httpx.post(f"http://127.0.0.1:{port}/fhir/Basic",
                               content=b'{"resourceType":"Basic","code":{"text":"w%d"}}' % i,
                               headers={"Content-Type": "application/fhir+json"}, timeout=30)
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            for rid in ids:
                assert c.get(f"/Basic/{rid}").status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_writes_leave_no_garbage_cycles(backend: str, new_db_url: Callable[[str], str]) -> None:
    """Creates, updates, deletes and reads free all their objects by reference counting: none is left in a
    reference cycle for the collector, whose passes under load took ~9 ms each (a write transaction and its
    connection used to refer to each other: ~12 objects a write)."""
    import asyncio
    import gc
    import json

    from dhp.api.app import create_app
    from dhp.settings import Settings

    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}], "gender": "male",
               "name": [{"family": "Karimov", "given": ["Aziz"]}], "birthDate": "1990-05-06"}

    async def run() -> tuple[int, set[int]]:
        settings = Settings.from_env({**os.environ, "DHP_DATABASE_URL": new_db_url(backend), "DHP_AUTH": "off",
                                      "DHP_VALIDATION": "off", "DHP_PACKAGE_IMPORT": "none"})
        app = create_app(settings)
        statuses: set[int] = set()

        async def call(method: str, path: str, body: bytes = b"") -> dict[str, Any]:
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                     "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                     "headers": [(b"host", b"x"), (b"content-type", b"application/fhir+json")]}
            out: list[bytes] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(m: dict[str, Any]) -> None:
                if m["type"] == "http.response.start":
                    statuses.add(m["status"])
                elif m["type"] == "http.response.body":
                    out.append(m.get("body", b""))

            await app(scope, receive, send)
            return json.loads(b"".join(out) or b"{}")

        async with app.app.router.lifespan_context(app.app):
            async def work(i: int) -> None:
                made = await call("POST", "/fhir/Patient", json.dumps(patient).encode())
                rid = made["id"]
                await call("GET", f"/fhir/Patient/{rid}")
                changed = {**patient, "id": rid, "gender": "female" if i % 2 else "male"}
                await call("PUT", f"/fhir/Patient/{rid}", json.dumps(changed).encode())
                if i % 3 == 0:
                    await call("DELETE", f"/fhir/Patient/{rid}")

            await asyncio.gather(*(work(i) for i in range(8)))  # warm: statements, plans, caches
            gc.collect()
            gc.disable()
            try:
                await asyncio.gather(*(work(i) for i in range(40)))
                left = gc.collect()
            finally:
                gc.enable()
        return left, statuses

    left, statuses = asyncio.run(run())
    assert statuses <= {200, 201, 204}, statuses
    assert left == 0
