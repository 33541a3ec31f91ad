"""The admin API: JSON under ``/admin/clients``, ``/admin/users`` and ``/admin/keys``.

Guarded by a bearer token carrying the dedicated ``dhp/admin`` scope. ``system/*.cruds`` is deliberately not
enough: it grants FHIR data, while this API mints credentials (a data-integration client must not be able to
create itself more powerful clients).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dhp.auth.core import AuthError, create_client, create_user, hash_password_async, rotate_client_secret
from dhp.store import auth as db

Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def admin_routes(server: Any) -> list[BaseRoute]:
    def guarded(fn: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            try:
                p = await server.auth.authenticate(request.headers)
            except AuthError as e:
                return _error(401, e.error, e.description,
                              {"WWW-Authenticate": e.www_authenticate})
            if not p.is_admin:
                return _error(403, "insufficient_scope", "The admin API needs the dhp/admin scope",
                              {"WWW-Authenticate": 'Bearer realm="dhp", error="insufficient_scope", '
                                                   'scope="dhp/admin"'})
            try:
                return await fn(request)
            except ValueError as e:
                return _error(400, "invalid_request", str(e))
        return wrapper

    async def body(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ValueError("the body must be application/json")
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise ValueError(f"malformed JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        return data

    def _str_list(v: Any, name: str) -> list[str]:
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{name} must be an array of strings")
        return v

    def _opt_str(v: Any, name: str) -> str | None:
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{name} must be a string")
        return v

    async def list_clients(request: Request) -> Response:
        return JSONResponse([c.public_view() for c in await db.list_clients(server.store)])

    async def add_client(request: Request) -> Response:
        d = await body(request)
        name, scopes = d.get("name"), d.get("scopes", d.get("scope"))
        if not isinstance(name, str) or not isinstance(scopes, str):
            raise ValueError("name and scopes (a space-separated string) are required")
        grant_types = d.get("grant_types")
        out = await create_client(server.store, name=name, scopes=scopes, public=bool(d.get("public", False)),
                                  redirect_uris=_str_list(d.get("redirect_uris"), "redirect_uris"),
                                  grant_types=_str_list(grant_types, "grant_types") if grant_types is not None
                                  else None,
                                  organization=_opt_str(d.get("organization"), "organization"))
        return JSONResponse(out, 201, headers={"Cache-Control": "no-store",
                                               "Location": f"/admin/clients/{out['client_id']}"})

    async def get_client(request: Request) -> Response:
        c = await db.get_client(server.store, request.path_params["client_id"])
        if c is None:
            return _error(404, "not_found", "no such client")
        return JSONResponse(c.public_view())

    async def revoke_client(request: Request) -> Response:
        cid = request.path_params["client_id"]
        if await db.get_client(server.store, cid) is None:
            return _error(404, "not_found", "no such client")
        await server.auth.revoke_client(cid)
        return Response(status_code=204)

    async def rotate_secret(request: Request) -> Response:
        secret = await rotate_client_secret(server.store, request.path_params["client_id"])
        server.auth.forget_client(request.path_params["client_id"])
        if secret is None:
            return _error(404, "not_found", "no such active confidential client")
        return JSONResponse({"client_id": request.path_params["client_id"], "client_secret": secret},
                            headers={"Cache-Control": "no-store"})

    async def list_users(request: Request) -> Response:
        return JSONResponse([u.public_view() for u in await db.list_users(server.store)])

    async def add_user(request: Request) -> Response:
        d = await body(request)
        username, password = d.get("username"), d.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise ValueError("username and password are required strings")
        out = await create_user(server.store, username=username, password=password,
                                fhir_user=_opt_str(d.get("fhir_user", d.get("fhirUser")), "fhir_user"),
                                role=_opt_str(d.get("role"), "role"), name=_opt_str(d.get("name"), "name"))
        return JSONResponse(out, 201, headers={"Location": f"/admin/users/{out['username']}"})

    async def get_user(request: Request) -> Response:
        u = await db.get_user(server.store, request.path_params["username"])
        if u is None:
            return _error(404, "not_found", "no such user")
        return JSONResponse(u.public_view())

    async def disable_user(request: Request) -> Response:
        if not await server.auth.disable_user(request.path_params["username"]):
            return _error(404, "not_found", "no such user")
        return Response(status_code=204)

    async def set_password(request: Request) -> Response:
        d = await body(request)
        pw = d.get("password")
        if not isinstance(pw, str) or len(pw) < 8:
            raise ValueError("password must be a string of at least 8 characters")
        if not await db.set_user_password(server.store, request.path_params["username"],
                                          await hash_password_async(pw)):
            return _error(404, "not_found", "no such user")
        return Response(status_code=204)

    async def rotate_keys(request: Request) -> Response:
        kid = await server.auth.rotate_keys()
        return JSONResponse({"kid": kid, "jwks": server.auth.public_jwks})

    return [
        Route("/admin/clients", guarded(list_clients), methods=["GET"]),
        Route("/admin/clients", guarded(add_client), methods=["POST"]),
        Route("/admin/clients/{client_id}", guarded(get_client), methods=["GET"]),
        Route("/admin/clients/{client_id}", guarded(revoke_client), methods=["DELETE"]),
        Route("/admin/clients/{client_id}/rotate-secret", guarded(rotate_secret), methods=["POST"]),
        Route("/admin/users", guarded(list_users), methods=["GET"]),
        Route("/admin/users", guarded(add_user), methods=["POST"]),
        Route("/admin/users/{username}", guarded(get_user), methods=["GET"]),
        Route("/admin/users/{username}/disable", guarded(disable_user), methods=["POST"]),
        Route("/admin/users/{username}/password", guarded(set_password), methods=["POST"]),
        Route("/admin/keys/rotate", guarded(rotate_keys), methods=["POST"]),
    ]
