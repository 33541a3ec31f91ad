"""A server process settles its heap once start-up is done; apps built by tests (many per process) do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

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
