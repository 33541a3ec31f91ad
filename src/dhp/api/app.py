"""The ASGI application: start-up wiring of every service, and the routes."""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from dhp.api import http
from dhp.api.fhir import FHIRApp
from dhp.conformance import Registry, load_registry
from dhp.errors import FHIRError
from dhp.interactions.context import Server
from dhp.interactions.packages import install_packages
from dhp.settings import Settings
from dhp.store import Store, unavailable, unstorable_value

log = logging.getLogger("dhp")


def _optional(module: str) -> Any:
    """Import a sibling service package if it is present in this build."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


async def build_server(settings: Settings, registry: Registry | None = None, *, install: bool = True) -> Server:
    """Open the store, load the packages and create every service; the same in every process."""
    registry = registry or load_registry(settings)
    store = Store(settings.database_url, settings.database_read_url)
    await store.open(migrate=settings.auto_migrate)
    server = Server(settings, registry, store)
    terminology = _optional("dhp.terminology.engine")
    if terminology is not None and hasattr(terminology, "Terminology"):
        server.terminology = terminology.Terminology(registry)
    else:
        term_pkg = _optional("dhp.terminology")
        if term_pkg is not None and hasattr(term_pkg, "Terminology"):
            server.terminology = term_pkg.Terminology(registry)
    validation = _optional("dhp.validation")
    if validation is not None and hasattr(validation, "Validator"):
        server.validator = validation.Validator(registry, server.terminology,
                                                require_meta_profile=settings.require_meta_profile)
    search = _optional("dhp.search")
    if search is not None and hasattr(search, "SearchEngine"):
        server.search = search.SearchEngine(registry, server.terminology)
    documents = _optional("dhp.documents")
    if documents is not None and hasattr(documents, "DocumentService"):
        server.documents = documents.DocumentService(server)
    if install:
        await install_packages(server)
    await server.sync_conformance()
    return server


def _auth_module(settings: Settings) -> Any:
    if settings.auth == "off":
        return None
    auth = _optional("dhp.auth")
    if auth is None or not hasattr(auth, "authenticate"):
        raise RuntimeError("DHP_AUTH=on but the auth module is missing; set DHP_AUTH=off explicitly to run open")
    return auth


#: Net new objects between two collections of the youngest generation (CPython's default: 700). Under load
#: the objects alive at any moment are mostly the requests in flight (parsed bodies, index rows, statements),
#: and each collection walks all of them: with 700 a busy server collected every few requests.
GC_THRESHOLD = (20_000, 20, 20)


def settle_heap() -> None:
    """For a process that serves one app for its life, once start-up is done: what start-up built (package
    definitions, compiled expressions, caches) is frozen out of the collector's sight (``gc.freeze``), so
    that full collections stop walking it — they took ~80 ms each, every few seconds under load — and the
    youngest generation is collected less often. Not for processes that build many apps (tests): frozen
    objects are freed by reference counting only, never by the collector."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def create_process_app() -> FastPath:
    """The app of a server process (``dhp serve --workers N`` starts each worker with this factory)."""
    return create_app(own_process=True)


def create_app(settings: Settings | None = None, registry: Registry | None = None, *,
               own_process: bool = False) -> FastPath:
    """``own_process``: this app is the process's only one, for its whole life (see :func:`settle_heap`)."""
    settings = settings or Settings.from_env()
    fhir = FHIRApp()
    auth = _auth_module(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server = await build_server(settings, registry)
        app.state.server = server
        app.state.admin_client = None
        if auth is not None:
            await auth.start(server)
            server.check_resource = auth.check_resource
            app.state.admin_client = await auth.ensure_admin_client(server)

            async def authenticate(request: Request) -> Any:
                try:
                    return await auth.authenticate(server, request.headers)
                except auth.AuthError as e:
                    raise FHIRError(401, str(e) or "Invalid or missing access token", "login",
                                    message_id="invalid-token",
                                    headers={"WWW-Authenticate": e.www_authenticate}) from None

            fhir.authenticate = authenticate
        else:
            log.warning("DHP_AUTH=off: the FHIR API is open to anyone who can reach it")
        fhir.server = server
        if own_process:
            settle_heap()
        try:
            yield
        finally:
            if auth is not None and hasattr(auth, "stop"):
                await auth.stop(server)
            await server.store.close()

    async def root(_: Request) -> Response:
        return RedirectResponse("/fhir/metadata")

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes: list[BaseRoute] = [Route("/", root), Route("/healthz", health)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={Exception: _error_response})
    direct: dict[tuple[str, str], Any] = {}
    if auth is not None:
        # Auth routes need the Server, which exists only after start-up: resolve it lazily.
        for r in auth.routes(_LazyServer(app, settings)):
            app.router.routes.insert(0, r)
            if isinstance(r, Route) and r.path in getattr(auth, "HOT_PATHS", ()):
                direct.update({(m, r.path): r.endpoint for m in r.methods or ()})
    documents = _optional("dhp.documents")
    if documents is not None and hasattr(documents, "routes"):
        for r in documents.routes(_LazyServer(app, settings)):
            app.router.routes.insert(0, r)
    app.router.routes.append(Mount("/fhir", app=fhir))
    app.state.fhir = fhir

    async def not_found(request: Request, exc: Exception) -> Response:
        return http.error_response(FHIRError(404, f"No such endpoint: {request.url.path}", "not-found"))

    app.add_exception_handler(404, not_found)
    return FastPath(app, fhir, direct)


class FastPath:
    """Sends FHIR API requests straight to the FHIR app, past route matching (they are nearly all the
    traffic); everything else — SSO, well-known documents, pages — goes through the Starlette router."""

    def __init__(self, app: Starlette, fhir: FHIRApp, direct: dict[tuple[str, str], Any] | None = None) -> None:
        self.app = app
        self.fhir = fhir
        self.state = app.state
        self.router = app.router
        #: (method, path) → endpoint for the few hot non-FHIR endpoints (token issue): called past the router.
        self.direct = direct or {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if (path.startswith("/fhir/") or path == "/fhir") and "/.well-known/" not in path \
                and self.fhir.server is not None:
            scope = dict(scope)
            scope["app"] = self.app
            scope["root_path"] = scope.get("root_path", "") + "/fhir"
            await self.fhir(scope, receive, send)
            return
        endpoint = self.direct.get((scope.get("method", ""), path)) if path else None
        if endpoint is not None and getattr(self.state, "server", None) is not None:
            request = Request({**scope, "app": self.app}, receive)
            try:
                response = await endpoint(request)
            except Exception as e:  # what the router's error middleware would do
                response = await _error_response(request, e)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _error_response(request: Request, exc: Exception) -> Response:
    """What escapes the SSO and other non-FHIR endpoints, in OAuth's error shape (RFC 6749 §5.2): a database
    outage is ``temporarily_unavailable`` (503, ``Retry-After``), anything else a bug (500)."""
    if unavailable(exc):
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        return JSONResponse({"error": "temporarily_unavailable",
                             "error_description": "The database is unavailable; try again shortly"}, 503,
                            headers={"Retry-After": "5", "Cache-Control": "no-store"})
    if unstorable_value(exc):
        return JSONResponse({"error": "invalid_request",
                             "error_description": "The request contains a value the server cannot store "
                                                   "(a NUL character, or text too long)"}, 400,
                            headers={"Cache-Control": "no-store"})
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse({"error": "server_error", "error_description": "Internal error"}, 500,
                        headers={"Cache-Control": "no-store"})


class _LazyServer:
    """Stands in for the Server until the lifespan has built it (attribute access is forwarded)."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        self._app = app
        self.settings = settings

    def __getattr__(self, name: str) -> Any:
        server = getattr(self._app.state, "server", None)
        if server is None:
            raise RuntimeError("server not started")
        return getattr(server, name)
