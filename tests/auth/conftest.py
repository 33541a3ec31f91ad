"""Fixtures of the SSO tests: a real DHP server with auth on (the lead's ``start_server``), users, clients and
small helpers for the OAuth flows."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import secrets
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from tests.conftest import LiveServer
from tests.pgserver import free_port

REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the tests read the Location header
PASSWORD = "correct horse battery"


def _own_server(env: dict[str, str], registry: Any) -> LiveServer:
    """The real FHIR API (``dhp.api.fhir.FHIRApp`` + interactions) with our routes, built without the
    optional services — used only when the full app cannot start while other areas are mid-change."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Mount

    import dhp.auth as auth
    from dhp.api.fhir import FHIRApp
    from dhp.errors import FHIRError
    from dhp.interactions.context import Server
    from dhp.settings import Settings
    from dhp.store import Store

    settings = Settings.from_env({**os.environ, **env})
    fhir = FHIRApp()
    holder: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        store = Store(settings.database_url)
        await store.open()
        server = Server(settings, registry, store)
        await auth.start(server)
        server.check_resource = auth.check_resource
        app.state.server = server
        app.state.admin_client = await auth.ensure_admin_client(server)

        async def authenticate(request: Request) -> Any:
            try:
                return await auth.authenticate(server, request.headers)
            except auth.AuthError as e:
                raise FHIRError(401, str(e), "login", message_id="invalid-token",
                                headers={"WWW-Authenticate": e.www_authenticate}) from None

        fhir.authenticate = authenticate
        fhir.server = server
        holder["loop"] = asyncio.get_running_loop()
        yield
        await auth.stop(server)
        await store.close()

    class Lazy:
        settings_ = settings

        def __getattr__(self, name: str) -> Any:
            if name == "settings":
                return settings
            return getattr(app.state.server, name)

    app = Starlette(lifespan=lifespan)
    for r in auth.routes(Lazy()):
        app.router.routes.append(r)
    app.router.routes.append(Mount("/fhir", app=fhir))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                       loop="asyncio", http="h11"))
    uv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: asyncio.run(uv.serve()), daemon=True)
    t.start()
    deadline = time.time() + 120
    while not uv.started:
        if not t.is_alive() or time.time() > deadline:
            raise RuntimeError("auth test server did not start")
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    base = f"http://127.0.0.1:{port}"
    s = LiveServer(base, base + "/fhir", app.state.server, app, uv, t, app.state.admin_client)
    s.loop = holder["loop"]  # type: ignore[attr-defined]
    return s


def start_auth_server(start_server: Callable[..., LiveServer], registry: Any, db_url: str,
                      **env: str) -> LiveServer:
    """Prefer the lead's full server; fall back to our own app around the real FHIR API."""
    full_env = {"DHP_DATABASE_URL": db_url, "DHP_AUTH": "on", "DHP_VALIDATION": "off",
                "DHP_PACKAGE_IMPORT": "none", **env}
    try:
        s = start_server(**full_env)
    except Exception as e:  # another area's code does not import right now
        warnings.warn(f"full DHP app did not start ({e}); using the auth test app", stacklevel=2)
        return _own_server(full_env, registry)
    return s


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
    if getattr(s, "loop", None) is not None:
        return
    # The lead's LiveServer runs uvicorn inside asyncio.run on a thread: its store's engine pool is bound to
    # that loop. Find the loop from the uvicorn server's running tasks.
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running() and not obj.is_closed():
            # The test thread has no running loop, so every running loop belongs to a server thread; pick the
            # one whose thread serves this LiveServer.
            thread_id = getattr(obj, "_thread_id", None)
            if thread_id == s._thread.ident:
                s.loop = obj  # type: ignore[attr-defined]
                return
    raise RuntimeError("cannot find the server's event loop")


def make_sso(start_server: Callable[..., LiveServer], registry: Any, db_url: str, **env: str) -> SSO:
    live = start_auth_server(start_server, registry, db_url, **env)
    _attach_loop(live)
    admin = live.admin_client
    assert admin and admin.get("client_secret"), "an empty database must print an admin client"
    return SSO(live, admin)


@pytest.fixture(scope="session")
def sso(start_server: Callable[..., LiveServer], registry: Any, new_db_url: Callable[[str], str]) -> SSO:
    """A server on SQLite with auth on."""
    return make_sso(start_server, registry, new_db_url("sqlite"))


@pytest.fixture(scope="session")
def sso_pg(start_server: Callable[..., LiveServer], registry: Any, new_db_url: Callable[[str], str]) -> SSO:
    """A server on PostgreSQL with auth on."""
    return make_sso(start_server, registry, new_db_url("pg"))


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


@pytest.fixture
def browser_client(sso: SSO) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sso.base, follow_redirects=False, timeout=30) as c:
        yield c
