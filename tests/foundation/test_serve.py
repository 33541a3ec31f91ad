"""The README's server command, end to end: `dhp serve` on a fresh embedded database."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.pgserver import free_port
from tests.serving import wait_serving


def test_dhp_serve_starts_prints_admin_client_and_serves(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DHP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'dhp.db'}",
           "DHP_PACKAGE_IMPORT": "ig", "DHP_LOG_LEVEL": "warning"}
    env.pop("DHP_AUTH", None)
    proc = subprocess.Popen([sys.executable, "-m", "dhp.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(proc, port)
        cs = httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=30)
        assert cs.status_code == 200 and cs.json()["fhirVersion"] == "5.0.0"
        # auth is on by default: the API wants a token, and the admin client was printed once
        r = httpx.get(f"http://127.0.0.1:{port}/fhir/Patient/x", timeout=30)
        assert r.status_code == 401 and "Bearer" in r.headers.get("WWW-Authenticate", "")
    finally:
        proc.terminate()
        out, _err = proc.communicate(timeout=30)
    assert "client_id:" in out and "client_secret:" in out
    lines = dict(line.strip().split(":", 1) for line in out.splitlines() if line.strip().startswith("client_"))
    # the printed credentials work when the server runs again on the same database
    proc2 = subprocess.Popen([sys.executable, "-m", "dhp.cli", "serve", "--port", str(port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(proc2, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            t = c.post("/oauth/token", data={"grant_type": "client_credentials",
                                             "client_id": lines["client_id"].strip(),
                                             "client_secret": lines["client_secret"].strip()})
            assert t.status_code == 200, t.text
            access = t.json()["access_token"]
            created = c.post("/fhir/Basic", content=b'{"resourceType":"Basic","code":{"text":"t"}}',
                             headers={"Authorization": f"Bearer {access}",
                                      "Content-Type": "application/fhir+json"})
            assert created.status_code == 201, created.text
    finally:
        proc2.terminate()
        out2, _ = proc2.communicate(timeout=30)
    assert "client_secret:" not in out2  # printed on first start only


def test_postgresql_over_its_unix_socket(pg: Any, start_server: Callable[..., Any]) -> None:
    """``postgresql+asyncpg://user@/db?host=/socket/dir``: every connection the server makes — SQLAlchemy's and
    the driver connections it owns for reads by id and write-only statements — goes to that socket."""
    url = pg.create_db("unix_" + uuid.uuid4().hex[:6])
    unix = url.replace(f"@127.0.0.1:{pg.port}/", "@/") + f"?host={pg.dir}&port={pg.port}"
    assert "127.0.0.1" not in unix
    live = start_server(DHP_DATABASE_URL=unix, DHP_AUTH="off", DHP_VALIDATION="off")
    with httpx.Client(base_url=live.fhir, timeout=60, headers={"Content-Type": "application/fhir+json"}) as c:
        made = c.post("/Patient", json={"resourceType": "Patient", "gender": "female"})
        assert made.status_code == 201, made.text
        pid = made.json()["id"]
        got = c.get(f"/Patient/{pid}")
        assert got.status_code == 200 and got.json()["gender"] == "female"
        assert c.get("/Patient", params={"gender": "female"}).json()["total"] == 1
