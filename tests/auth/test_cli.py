"""``dhp clients …`` and ``dhp users …`` in the exact forms scripts use, against the running server's database:
what the CLI creates works on the live server at once (they share only the database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from dhp.auth.core import CLIENT_TTL, REVOCATION_POLL
from tests.auth.conftest import PASSWORD, REDIRECT, SSO, login_and_consent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def dhp(sso: SSO, *args: str) -> Result:
    """``dhp …`` in-process through the real Typer app (a subprocess costs seconds of imports each)."""
    from typer.testing import CliRunner

    from dhp.cli import app

    r = CliRunner().invoke(app, list(args), env={"DHP_DATABASE_URL": sso.live.server.settings.database_url})
    return Result(r.exit_code, r.stdout, r.stderr)


def test_the_installed_command_prints_json(sso: SSO) -> None:
    env = {**os.environ, "DHP_DATABASE_URL": sso.live.server.settings.database_url}
    p = subprocess.run([sys.executable, "-m", "dhp.cli", "clients", "create", "--name", "Script", "--scopes",
                        "system/Patient.rs", "--json"], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == {"client_id", "client_secret"}


def run_json(sso: SSO, *args: str) -> Any:
    p = dhp(sso, *args)
    assert p.returncode == 0, p.stderr + p.stdout
    return json.loads(p.stdout)


def test_clients_cli(sso: SSO) -> None:
    created = run_json(sso, "clients", "create", "--name", "Lab system", "--scopes", "system/Observation.cruds",
                       "--json")
    assert set(created) == {"client_id", "client_secret"}
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **created})
    assert r.status_code == 200 and r.json()["scope"] == "system/Observation.cruds"
    pub = run_json(sso, "clients", "create", "--name", "Mobile app", "--scopes", "patient/*.rs launch/patient",
                   "--public", "--redirect-uri", REDIRECT, "--redirect-uri", REDIRECT + "/2", "--json")
    assert set(pub) == {"client_id"}  # no secret for a public client
    listed = run_json(sso, "clients", "list", "--json")
    mine = {c["client_id"]: c for c in listed}
    assert mine[pub["client_id"]]["public"] is True
    assert mine[pub["client_id"]]["redirect_uris"] == [REDIRECT, REDIRECT + "/2"]
    assert "client_secret" not in json.dumps(listed) and created["client_secret"] not in json.dumps(listed)
    rotated = run_json(sso, "clients", "rotate-secret", created["client_id"], "--json")
    assert rotated["client_secret"] != created["client_secret"]
    time.sleep(CLIENT_TTL + 0.1)  # another process (the CLI) changed it: the server's cache lives this long
    assert httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **created}
                      ).status_code == 401
    new = {"client_id": created["client_id"], "client_secret": rotated["client_secret"]}
    assert httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **new}).status_code == 200
    assert run_json(sso, "clients", "revoke", created["client_id"], "--json")["revoked"] is True
    time.sleep(max(CLIENT_TTL, REVOCATION_POLL) + 0.1)
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **new})
    assert r.status_code == 401
    # Bad input: a clear message and a non-zero exit, no traceback.
    p = dhp(sso, "clients", "create", "--name", "x", "--scopes", "system/*.nope", "--json")
    assert p.returncode != 0 and "cruds" in p.stderr and "Traceback" not in p.stderr
    p = dhp(sso, "clients", "create", "--name", "x", "--scopes", "user/*.rs", "--public", "--json")
    assert p.returncode != 0 and "redirect URI" in p.stderr


def test_users_cli(sso: SSO) -> None:
    pat = sso.put({"resourceType": "Patient", "active": True})["id"]
    made = run_json(sso, "users", "create", "--username", "cli-user", "--password", PASSWORD,
                    "--fhir-user", f"Patient/{pat}", "--json")
    assert made == {"username": "cli-user", "fhir_user": f"Patient/{pat}", "role": "patient"}
    doctor = run_json(sso, "users", "create", "--username", "cli-doctor", "--password", PASSWORD,
                      "--fhir-user", "Practitioner/d1", "--json")
    assert doctor["role"] == "practitioner"
    p = dhp(sso, "users", "create", "--username", "cli-user", "--password", PASSWORD, "--json")
    assert p.returncode != 0 and "exists" in p.stderr
    users = {u["username"]: u for u in run_json(sso, "users", "list", "--json")}
    assert users["cli-user"]["fhir_user"] == f"Patient/{pat}" and "password_hash" not in users["cli-user"]
    c = sso.create_client("patient/*.rs launch/patient", redirect_uris=[REDIRECT])
    q = login_and_consent(sso, c["client_id"], "cli-user", scope="patient/*.rs")
    assert "code" in q
    assert run_json(sso, "users", "set-password", "cli-user", "--password", "another password", "--json")[
        "password_set"] is True
    assert run_json(sso, "users", "disable", "cli-doctor", "--json")["disabled"] is True
    assert users["cli-doctor"]["disabled"] is False
    assert run_json(sso, "users", "list", "--json")[0]["username"]
    p = dhp(sso, "users", "disable", "nobody-here", "--json")
    assert p.returncode == 1
