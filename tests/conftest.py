"""Session fixtures: the loaded packages, a real PostgreSQL, and real DHP servers over loopback HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pgserver import PgServer, free_port

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def registry() -> Any:
    from dhp.conformance import load_registry
    from dhp.settings import Settings

    return load_registry(Settings.from_env())


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_url(pg: PgServer) -> str:
    return pg.create_db("dhp_" + uuid.uuid4().hex[:8])


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dhp-test-"))
    yield d
    # The session's SQLite databases (~0.8 GB a run): gone with the session, like the PostgreSQL data dir.
    shutil.rmtree(d, ignore_errors=True)


def sqlite_url(tmp_root: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_root / ('db-' + uuid.uuid4().hex[:8] + '.db')}"


@pytest.fixture(scope="session")
def new_db_url(pg: PgServer, tmp_root: Path) -> Callable[[str], str]:
    """Factory: a fresh, empty database URL for 'sqlite' or 'pg'."""

    def make(backend: str) -> str:
        if backend == "pg":
            return pg.create_db("dhp_" + uuid.uuid4().hex[:8])
        return sqlite_url(tmp_root)

    return make


@dataclass
class LiveServer:
    base: str
    fhir: str
    server: Any  # dhp.interactions.context.Server
    app: Any
    _uv: Any
    _thread: threading.Thread
    admin_client: dict[str, str] | None = None
    loop: Any = None  # the server's event loop (for tests that must run coroutines on it)

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=30)


def _start(env: dict[str, str]) -> LiveServer:
    import uvicorn

    from dhp.api import create_app
    from dhp.settings import Settings

    port = free_port()
    settings = Settings.from_env({**os.environ, **env})
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            loop="asyncio", http="h11")
    uv = uvicorn.Server(config)
    uv.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    loops: list[Any] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        loop.run_until_complete(uv.serve())
        loop.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 180
    while not uv.started:
        if not t.is_alive() or time.time() > deadline:
            raise RuntimeError("DHP test server did not start")
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    base = f"http://127.0.0.1:{port}"
    state = app.state
    return LiveServer(base, base + "/fhir", state.server, app, uv, t, getattr(state, "admin_client", None),
                      loops[0] if loops else None)


@pytest.fixture(scope="session")
def start_server(tmp_root: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start_server(**env) → a real DHP server on a free loopback port (stopped at session end).

    It asks for ``tmp_root`` so that the servers stop before their SQLite files are removed."""
    started: list[LiveServer] = []

    def start(**env: str) -> LiveServer:
        s = _start(env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, start_server: Callable[..., LiveServer],
           new_db_url: Callable[[str], str]) -> LiveServer:
    """The default server of each backend: auth off, write-time profile validation off (generic REST tests
    use minimal resources), all packages loaded; only the DHP IGs' conformance resources are stored in its database
    (DHP_PACKAGE_IMPORT=ig) to keep start-up short. Tests of auth or validation start their own servers."""
    return start_server(DHP_DATABASE_URL=new_db_url(request.param), DHP_AUTH="off", DHP_VALIDATION="off",
                        DHP_PACKAGE_IMPORT="ig")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
