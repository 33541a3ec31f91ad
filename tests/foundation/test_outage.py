"""A database outage is answered with 503 and an OperationOutcome (never a 500), and the server recovers by
itself when the database is back: no restart, nothing half-written."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dhp.store import unavailable
from tests.pgserver import PgServer

H = {"Content-Type": "application/fhir+json"}
PATIENT = {"resourceType": "Patient", "name": [{"family": "Uzilishov"}], "gender": "male"}


def test_postgresql_outage_is_503_then_recovers(start_server: Callable[..., Any]) -> None:
    pg = PgServer()
    pg.start()
    try:
        live = start_server(DHP_DATABASE_URL=pg.create_db("outage"), DHP_AUTH="off", DHP_VALIDATION="off")
        with httpx.Client(base_url=live.fhir, timeout=60, headers=H) as c:
            made = c.post("/Patient", json=PATIENT)
            assert made.status_code == 201, made.text
            pid = made.json()["id"]
            assert c.get(f"/Patient/{pid}").status_code == 200

            pg.halt()
            during = [c.get(f"/Patient/{pid}"), c.post("/Patient", json=PATIENT),
                      c.put(f"/Patient/{pid}", json={**PATIENT, "id": pid, "gender": "female"}),
                      c.get("/Patient", params={"family": "uzilishov"})]
            for r in during:
                assert r.status_code == 503, (r.request.method, r.status_code, r.text)
                body = r.json()
                assert body["resourceType"] == "OperationOutcome"
                assert body["issue"][0]["code"] == "transient"
                assert r.headers["Retry-After"] == "5"

            pg.resume()
            # Connections that died with the server fail once each (503 again), then are replaced.
            codes = []
            for _ in range(40):
                r = c.get(f"/Patient/{pid}")
                codes.append(r.status_code)
                if r.status_code == 200:
                    break
                time.sleep(0.1)
            assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
            back = None
            for _ in range(40):
                back = c.post("/Patient", json=PATIENT)
                if back.status_code != 503:
                    break
            assert back is not None and back.status_code == 201, back.text
            # the update attempted during the outage left nothing behind
            cur = c.get(f"/Patient/{pid}").json()
            assert cur["meta"]["versionId"] == "1" and cur["gender"] == "male"
            found = c.get("/Patient", params={"family": "uzilishov", "_total": "accurate"}).json()
            assert found["total"] == 2
    finally:
        pg.stop()


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("exc", "expected"), [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (_PgError("57P01"), True),  # admin shutdown
    (_PgError("53300"), True),  # too many connections
    (_PgError("08006"), True),  # connection failure
    (_PgError("23505"), False),  # unique violation: not an outage
    (sqlite3.OperationalError("database is locked"), True),
    (sqlite3.OperationalError("no such table: x"), False),
    (OSError(113, "No route to host"), True),
    (FileNotFoundError(2, "No such file"), False),  # a missing file is a bug, not an outage
    (RuntimeError("a bug"), False),
    (ValueError("bad input"), False),
])
def test_unavailable_tells_outages_from_bugs(exc: BaseException, expected: bool) -> None:
    assert unavailable(exc) is expected
    wrapped = RuntimeError("while reading")
    wrapped.__cause__ = exc
    assert unavailable(wrapped) is expected


def test_sso_outage_is_oauth_temporarily_unavailable(start_server: Callable[..., Any]) -> None:
    """The token endpoint answers a database outage in OAuth's error shape (RFC 6749 §5.2), 503, and issues
    tokens again once the database is back."""
    pg = PgServer()
    pg.start()
    try:
        live = start_server(DHP_DATABASE_URL=pg.create_db("ssoout"), DHP_AUTH="on")
        admin = live.admin_client
        assert admin is not None
        form = {"grant_type": "client_credentials", "client_id": admin["client_id"],
                "client_secret": admin["client_secret"]}
        with httpx.Client(base_url=live.base, timeout=60) as c:
            assert c.post("/oauth/token", data=form).status_code == 200
            pg.halt()
            r = c.post("/oauth/token", data=form)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "temporarily_unavailable"
            assert r.headers["Retry-After"] == "5"
            pg.resume()
            codes = []
            for _ in range(40):
                r = c.post("/oauth/token", data=form)
                codes.append(r.status_code)
                if r.status_code == 200:
                    break
                time.sleep(0.1)
            assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
    finally:
        pg.stop()
