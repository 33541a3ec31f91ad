"""Fixtures of the SSO tests: the real DHP server with auth on (the lead's ``start_server``, SQLite and
PostgreSQL), users, clients and small helpers for the OAuth flows."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.conftest import LiveServer

REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the tests read the Location header
PASSWORD = "correct horse battery"


def start_auth_server(start_server: Callable[..., LiveServer], db_url: str, **env: str) -> LiveServer:
    """The lead's full server with auth on (validation and package import off: not what these tests test)."""
    return start_server(DHP_DATABASE_URL=db_url, DHP_AUTH="on", DHP_VALIDATION="off", DHP_PACKAGE_IMPORT="none",
                        **env)


@dataclass
class SSO:
    """A running server plus the handles the tests need."""

    live: LiveServer
    admin: dict[str, str]

    @property
    def base(self) -> str:
        return self.live.base

    @property
    def fhir(self) -> str:
        return self.live.fhir

    @property
    def state(self) -> Any:
        return self.live.server.auth

    def call(self, coro: Any) -> Any:
        """Run ``coro`` on the server's event loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.live.loop  # type: ignore[attr-defined, no-any-return]

    def admin_token(self) -> str:
        r = httpx.post(self.base + "/oauth/token", data={"grant_type": "client_credentials", **self.admin})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    def create_client(self, scopes: str, *, public: bool = False, redirect_uris: list[str] | None = None,
                      grant_types: list[str] | None = None, name: str = "test client") -> dict[str, str]:
        body: dict[str, Any] = {"name": name, "scopes": scopes, "public": public,
                                "redirect_uris": redirect_uris or []}
        if grant_types is not None:
            body["grant_types"] = grant_types
        r = httpx.post(self.base + "/admin/clients", json=body,
                       headers={"Authorization": "Bearer " + self.admin_token()})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def create_user(self, fhir_user: str | None = None, name: str | None = None) -> str:
        username = "u" + uuid.uuid4().hex[:10]
        body: dict[str, Any] = {"username": username, "password": PASSWORD}
        if fhir_user:
            body["fhir_user"] = fhir_user
        if name:
            body["name"] = name
        r = httpx.post(self.base + "/admin/users", json=body,
                       headers={"Authorization": "Bearer " + self.admin_token()})
        assert r.status_code == 201, r.text
        return username

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Create a resource through the FHIR API with the admin token (system/*.cruds)."""
        r = httpx.post(f"{self.fhir}/{resource['resourceType']}", json=resource,
                       headers={"Authorization": "Bearer " + self.admin_token(),
                                "Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]


def _attach_loop(s: LiveServer) -> None:
    # The store's connections belong to the server's loop, so in-process checks must run there.
    if s.loop is None:
        raise RuntimeError("the test server exposes no event loop")


def make_sso(start_server: Callable[..., LiveServer], db_url: str, **env: str) -> SSO:
    live = start_auth_server(start_server, db_url, **env)
    _attach_loop(live)
    admin = live.admin_client
    assert admin and admin.get("client_secret"), "an empty database must print an admin client"
    return SSO(live, admin)


@pytest.fixture(scope="session")
def sso(start_server: Callable[..., LiveServer], new_db_url: Callable[[str], str]) -> SSO:
    """A server on SQLite with auth on."""
    return make_sso(start_server, new_db_url("sqlite"))


@pytest.fixture(scope="session")
def sso_pg(start_server: Callable[..., LiveServer], new_db_url: Callable[[str], str]) -> SSO:
    """A server on PostgreSQL with auth on."""
    return make_sso(start_server, new_db_url("pg"))


@pytest.fixture(params=["sqlite", "pg"])
def any_sso(request: pytest.FixtureRequest) -> SSO:
    return request.getfixturevalue("sso" if request.param == "sqlite" else "sso_pg")  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- PKCE / flows

def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def hidden(html: str, name: str) -> str:
    m = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert m, f"no hidden field {name}"
    import html as h

    return h.unescape(m.group(1))


def login_and_consent(sso: SSO, client_id: str, username: str, *, scope: str,
                      redirect_uri: str = REDIRECT, challenge: str | None = None, state: str = "st",
                      nonce: str | None = None, patient: str | None = None,
                      http: httpx.Client | None = None) -> dict[str, list[str]]:
    """Drive the login + consent pages like a browser; returns the redirect's query parameters."""
    c = http or httpx.Client(base_url=sso.base, follow_redirects=False)
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
              "state": state, "aud": sso.fhir}
    if challenge:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    if nonce:
        params["nonce"] = nonce
    r = c.get("/oauth/authorize", params=params)
    assert r.status_code == 200, r.text
    if 'name="step" value="login"' in r.text:
        r = c.post("/oauth/authorize", data={"step": "login", "csrf_token": hidden(r.text, "csrf_token"),
                                             "request": hidden(r.text, "request"), "username": username,
                                             "password": PASSWORD, "lang": "en"})
        assert r.status_code == 200, r.text
    form = {"step": "consent", "csrf_token": hidden(r.text, "csrf_token"), "request": hidden(r.text, "request"),
            "ticket": hidden(r.text, "ticket"), "decision": "allow", "lang": "en"}
    if patient:
        form["patient"] = patient
    r = c.post("/oauth/authorize", data=form)
    assert r.status_code == 303, r.text
    loc = r.headers["location"]
    assert loc.startswith(redirect_uri)
    return parse_qs(urlsplit(loc).query)
