"""HTTP endpoints of the SSO: token, authorize (login + consent pages), revoke, introspect, userinfo, JWKS and
the discovery documents.

Errors follow RFC 6749 §5.2 (JSON ``error``/``error_description``, ``Cache-Control: no-store``); a 401
``invalid_client`` carries ``WWW-Authenticate``. Authorization errors go back to the client's redirect URI,
except when the client or redirect URI cannot be trusted: then an error page is shown.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import jinja2
import orjson
from joserfc.errors import JoseError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from dhp.auth import i18n
from dhp.auth.audit import build_event
from dhp.auth.core import (
    CODE_LIFETIME,
    REFRESH_LIFETIME,
    AuthError,
    AuthState,
    hash_password,
    sha256,
    verify_client_secret,
    verify_password_async,
)
from dhp.auth.scopes import (
    ACCESS_SCOPES,
    IDENTITY_SCOPES,
    ScopeError,
    grant,
    parse_resource_scope,
    split_scope,
    validate_scopes,
)
from dhp.store import auth as db
from dhp.store import now_us

TEMPLATES = Path(__file__).parent / "templates"
CSRF_COOKIE = "dhp_csrf"
SESSION_COOKIE = "dhp_session"
SESSION_LIFETIME = 8 * 3600
REQUEST_LIFETIME = 900  # seconds a login page stays usable
TICKET_LIFETIME = 300
GRANT_TYPES = ("authorization_code", "client_credentials", "refresh_token")

# Throttling of failed sign-ins (state in the database, shared by all processes).
ACCOUNT_LIMIT = 5
ADDRESS_LIMIT = 20
THROTTLE_WINDOW = 15 * 60
THROTTLE_LOCK = 15 * 60

# Used with fullmatch: "$" would also accept a trailing newline.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")


#: Discovery documents name this server's URLs, which (without DHP_BASE_URL) come from the request's host
#: headers: a shared cache must keep one copy per host.
_PUBLIC_BY_HOST = {"Cache-Control": "public, max-age=300", "Vary": "Host, X-Forwarded-Host, X-Forwarded-Proto"}


@functools.cache
def _dummy_hash() -> str:
    # Verified against when the username is unknown, so both cases cost the same.
    return hash_password("dhp-timing-equaliser")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "error_description": self.description}, self.status,
                            headers={**_NO_STORE, **self.headers})


def _invalid_client(description: str = "Invalid client credentials") -> OAuthError:
    return OAuthError("invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="dhp"'})


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded body; a parameter given twice is an invalid_request (RFC 6749 §3.1)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if body and ctype != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "The body must be application/x-www-form-urlencoded")
    if len(body) > 64 * 1024:
        raise OAuthError("invalid_request", "Request body too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError) as e:
        raise OAuthError("invalid_request", "Malformed form body") from e
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise OAuthError("invalid_request", f"Parameter '{k}' is repeated")
        out[k] = v
    return out


def _claimed_client(request: Request, form: dict[str, str]) -> str | None:
    """The client id a request claims (for the audit trail of failures), authenticated or not."""
    auth = request.headers.get("authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            return unquote(base64.b64decode(auth[6:].strip()).decode("utf-8").partition(":")[0])[:64] or None
        except (ValueError, UnicodeDecodeError):
            return None
    cid = form.get("client_id")
    return cid[:64] if cid else None


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Endpoints:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                      autoescape=jinja2.select_autoescape(["html"]))

    @property
    def state(self) -> AuthState:
        return self.server.auth  # type: ignore[no-any-return]

    async def audit(self, **kw: Any) -> None:
        await self.state.audit.write(build_event(**kw))

    # ------------------------------------------------------------------ client authentication

    async def authenticate_client(self, request: Request, form: dict[str, str], *,
                                  require_secret: bool = False) -> db.ClientRow:
        auth = request.headers.get("authorization", "")
        client_id = secret = None
        if auth[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
                cid, sep, sec = raw.partition(":")
                if not sep:
                    raise ValueError("no colon")
            except (ValueError, UnicodeDecodeError) as e:
                raise _invalid_client("Malformed HTTP Basic credentials") from e
            client_id, secret = unquote(cid.replace("+", " ")), unquote(sec.replace("+", " "))
            if "client_secret" in form:
                raise OAuthError("invalid_request", "Use one client authentication method, not two")
            if form.get("client_id") not in (None, client_id):
                raise OAuthError("invalid_request", "client_id differs from the authenticated client")
        elif auth:
            raise _invalid_client("Unsupported client authentication scheme")
        else:
            client_id, secret = form.get("client_id"), form.get("client_secret")
        if not client_id:
            raise _invalid_client("Client authentication is required (client_id)")
        client = await self.state.client(client_id)
        if client is None or client.revoked_at is not None:
            raise _invalid_client()
        if client.public:
            if secret or require_secret:
                raise _invalid_client()
        elif not secret or not verify_client_secret(client, secret):
            raise _invalid_client()
        return client

    # ------------------------------------------------------------------ /oauth/token

    async def token(self, request: Request) -> Response:
        client: db.ClientRow | None = None
        gt = ""
        form: dict[str, str] = {}
        try:
            form = await _form(request)
            gt = form.get("grant_type", "")
            if not gt:
                raise OAuthError("invalid_request", "Missing required parameter: grant_type")
            if gt not in GRANT_TYPES:
                raise OAuthError("unsupported_grant_type", f"Grant type '{gt}' is not supported")
            client = await self.authenticate_client(request, form)
            if gt not in client.grant_types:
                raise OAuthError("unauthorized_client", f"This client may not use the {gt} grant")
            if gt == "client_credentials":
                body = await self._client_credentials(request, form, client)
            elif gt == "authorization_code":
                body = await self._authorization_code(request, form, client)
            else:
                body = await self._refresh(request, form, client)
        except OAuthError as e:
            await self.audit(kind="token", success=False, description=f"{gt or 'token'}: {e.error}: {e.description}",
                             client_id=client.client_id if client else _claimed_client(request, form),
                             client_name=client.name if client else None, address=_address(request))
            return e.response()
        return Response(orjson.dumps(body), 200, headers=_NO_STORE, media_type="application/json")

    async def _token_body(self, request: Request, client: db.ClientRow, *, sub: str, scope: list[str],
                    fhir_user: str | None, patient: str | None, grant_id: str | None) -> dict[str, Any]:
        token, claims = await self.state.issue_access_token(
            headers=request.headers, client_id=client.client_id, sub=sub, scope=scope, fhir_user=fhir_user,
            patient=patient, grant_id=grant_id)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                "expires_in": claims["exp"] - claims["iat"], "scope": " ".join(scope)}
        if patient:
            body["patient"] = patient
            body["need_patient_banner"] = True
        return body

    async def _client_credentials(self, request: Request, form: dict[str, str],
                                  client: db.ClientRow) -> dict[str, Any]:
        await self.state.maybe_reload_keys()
        allowed = split_scope(client.scopes)
        requested = split_scope(form["scope"]) if "scope" in form else allowed
        try:
            validate_scopes(requested)
        except ScopeError as e:
            raise OAuthError("invalid_scope", str(e)) from e
        granted = grant(requested, allowed, contexts=frozenset({"system"}))
        if not granted:
            raise OAuthError("invalid_scope", "None of the requested scopes is allowed for this client")
        # The event is committed while the token is signed (the response still waits for both): events then
        # arrive at the audit writer as requests do, in bursts that share a commit, not one per signature.
        body, _ = await asyncio.gather(
            self._token_body(request, client, sub=client.client_id, scope=granted, fhir_user=None, patient=None,
                             grant_id=None),
            self.audit(kind="token", success=True, description="client_credentials token issued",
                       client_id=client.client_id, client_name=client.name, address=_address(request)))
        return body

    async def _authorization_code(self, request: Request, form: dict[str, str],
                                  client: db.ClientRow) -> dict[str, Any]:
        code, redirect_uri = form.get("code"), form.get("redirect_uri")
        if not code:
            raise OAuthError("invalid_request", "Missing required parameter: code")
        if not redirect_uri:
            raise OAuthError("invalid_request", "Missing required parameter: redirect_uri")
        row = await db.consume_code(self.state.store, sha256(code), client.client_id)
        if row is None:
            raise OAuthError("invalid_grant", "Unknown authorization code")
        if row.client_id != client.client_id:  # left unused: see consume_code
            raise OAuthError("invalid_grant", "The authorization code was issued to another client")
        if row.replayed:
            # RFC 6749 §4.1.2: a second use of a code revokes what the first use got.
            await self.state.revoke_grant(row.grant_id)
            raise OAuthError("invalid_grant", "The authorization code was already used; "
                                              "the tokens issued from it are revoked")
        if row.redirect_uri != redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        if row.expires_at < now_us():
            raise OAuthError("invalid_grant", "The authorization code has expired")
        d = row.data
        verifier = form.get("code_verifier")
        if d.get("code_challenge"):
            if not verifier:
                raise OAuthError("invalid_grant", "Missing code_verifier (PKCE)")
            if not _VERIFIER.fullmatch(verifier):
                raise OAuthError("invalid_grant", "Malformed code_verifier")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=")
            if not hmac.compare_digest(digest.decode("ascii"), d["code_challenge"]):
                raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge (PKCE)")
        elif verifier:
            raise OAuthError("invalid_grant", "code_verifier given but the authorization request had no "
                                              "code_challenge")
        user = await db.get_user(self.state.store, d["username"])
        if user is None or user.disabled:
            raise OAuthError("invalid_grant", "The user is no longer active")
        scope: list[str] = d["scope"]
        body = await self._token_body(request, client, sub=user.username, scope=scope, fhir_user=user.fhir_user,
                                patient=d.get("patient"), grant_id=row.grant_id)
        if "openid" in scope:
            body["id_token"] = await self.state.issue_id_token(
                headers=request.headers, client_id=client.client_id, sub=user.username, fhir_user=user.fhir_user,
                nonce=d.get("nonce"), auth_time=d.get("auth_time"),
                name=user.name if "profile" in scope else None, with_fhir_user="fhirUser" in scope)
        if ACCESS_SCOPES & set(scope) and "refresh_token" in client.grant_types:
            body["refresh_token"] = await self._new_refresh(row.grant_id, client, d)
        await self.audit(kind="token", success=True, description="authorization_code token issued",
                         client_id=client.client_id, client_name=client.name, username=user.username,
                         fhir_user=user.fhir_user, patient=d.get("patient"), address=_address(request))
        return body

    async def _new_refresh(self, grant_id: str, client: db.ClientRow, data: dict[str, Any]) -> str:
        token = secrets.token_urlsafe(32)
        await db.insert_refresh(self.state.store, sha256(token), grant_id, client.client_id,
                                _refresh_data(data), now_us() + REFRESH_LIFETIME * 1_000_000)
        return token

    async def _refresh(self, request: Request, form: dict[str, str], client: db.ClientRow) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise OAuthError("invalid_request", "Missing required parameter: refresh_token")
        h = sha256(token)
        rec = await db.get_refresh(self.state.store, h)
        if rec is None:
            raise OAuthError("invalid_grant", "Unknown refresh token")
        if rec.client_id != client.client_id:
            raise OAuthError("invalid_grant", "The refresh token was issued to another client")
        if rec.expires_at < now_us():
            raise OAuthError("invalid_grant", "The refresh token has expired")
        d = dict(rec.data)
        scope: list[str] = d["scope"]
        if "scope" in form:
            requested = split_scope(form["scope"])
            try:
                validate_scopes(requested)
            except ScopeError as e:
                raise OAuthError("invalid_scope", str(e)) from e
            narrowed = grant(requested, scope, contexts=frozenset({"patient", "user"}),
                             extra=frozenset(s for s in scope if parse_resource_scope(s) is None))
            if not narrowed or set(narrowed) != set(requested):
                raise OAuthError("invalid_scope", "A refresh can only keep or narrow the original scope")
            d["scope"] = narrowed
        new = secrets.token_urlsafe(32)
        row, reused = await db.rotate_refresh(self.state.store, h, sha256(new), _refresh_data(d),
                                              now_us() + REFRESH_LIFETIME * 1_000_000)
        if row is None:
            raise OAuthError("invalid_grant", "Unknown refresh token")
        if reused:
            await self.state.revoke_grant(rec.grant_id)
            raise OAuthError("invalid_grant", "The refresh token was already used; the token family is revoked")
        user = await db.get_user(self.state.store, d["username"])
        if user is None or user.disabled:
            await self.state.revoke_grant(rec.grant_id)
            raise OAuthError("invalid_grant", "The user is no longer active")
        body = await self._token_body(request, client, sub=user.username, scope=d["scope"], fhir_user=user.fhir_user,
                                patient=d.get("patient"), grant_id=rec.grant_id)
        body["refresh_token"] = new
        if "openid" in d["scope"]:
            body["id_token"] = await self.state.issue_id_token(
                headers=request.headers, client_id=client.client_id, sub=user.username, fhir_user=user.fhir_user,
                nonce=None, auth_time=d.get("auth_time"), name=user.name if "profile" in d["scope"] else None,
                with_fhir_user="fhirUser" in d["scope"])
        await self.audit(kind="token", success=True, description="refresh_token: token issued",
                         client_id=client.client_id, client_name=client.name, username=user.username,
                         fhir_user=user.fhir_user, patient=d.get("patient"), address=_address(request))
        return body

    # ------------------------------------------------------------------ /oauth/revoke, /oauth/introspect

    async def revoke(self, request: Request) -> Response:
        client: db.ClientRow | None = None
        form: dict[str, str] = {}
        try:
            form = await _form(request)
            client = await self.authenticate_client(request, form)
            token = form.get("token")
            if not token:
                raise OAuthError("invalid_request", "Missing required parameter: token")
        except OAuthError as e:
            await self.audit(kind="revoke", success=False, description=f"revoke: {e.error}: {e.description}",
                             client_id=client.client_id if client else _claimed_client(request, form),
                             address=_address(request))
            return e.response()
        what = "nothing (unknown token)"
        claims = self._claims_ignoring_expiry(token)
        if claims is not None and "client_id" in claims:
            if claims["client_id"] == client.client_id and claims.get("jti"):
                await self.state.revoke_access_token(str(claims["jti"]), int(claims.get("exp", 0)))
                what = "access token"
        else:
            rec = await db.get_refresh(self.state.store, sha256(token))
            if rec is not None and rec.client_id == client.client_id:
                await self.state.revoke_grant(rec.grant_id)
                what = "refresh token family"
        await self.audit(kind="revoke", success=True, description=f"revoked {what}", client_id=client.client_id,
                         client_name=client.name, address=_address(request))
        return Response(b"", 200, headers=_NO_STORE)

    def _claims_ignoring_expiry(self, token: str, typ: str = "at+jwt") -> dict[str, Any] | None:
        """Claims of a JWS we signed with header ``typ`` (access token, request, ticket, session), else None."""
        if token.count(".") != 2:
            return None
        try:
            header, claims = self.state.decode(token)
        except (JoseError, ValueError):
            return None
        return claims if header.get("typ") == typ else None

    async def introspect(self, request: Request) -> Response:
        try:
            form = await _form(request)
            caller_admin = False
            caller_id: str | None = None
            if request.headers.get("authorization", "")[:7].lower() == "bearer ":
                try:
                    p = await self.state.authenticate(request.headers)
                except AuthError as e:
                    raise _invalid_client(e.description) from e
                if not p.is_admin:
                    raise OAuthError("insufficient_scope", "Introspection by bearer token needs dhp/admin", 403)
                caller_admin = True
            else:
                client = await self.authenticate_client(request, form)
                if client.public:
                    raise _invalid_client("Public clients cannot introspect tokens")
                caller_id, caller_admin = client.client_id, client.admin
            token = form.get("token")
            if not token:
                raise OAuthError("invalid_request", "Missing required parameter: token")
        except OAuthError as e:
            return e.response()
        info = await self._introspect(token, request)
        if info.get("active") and not caller_admin and info.get("client_id") != caller_id:
            info = {"active": False}
        return JSONResponse(info, headers=_NO_STORE)

    async def _introspect(self, token: str, request: Request) -> dict[str, Any]:
        claims = self._claims_ignoring_expiry(token)
        if claims is not None:
            if "client_id" not in claims or int(claims.get("exp", 0)) <= time.time():
                return {"active": False}
            await self.state.sync_revocations(force=True)
            if self.state.is_revoked(claims.get("jti"), claims.get("gid"), claims["client_id"],
                                     str(claims.get("sub", "")), int(claims.get("iat", 0))):
                return {"active": False}
            out = {"active": True, "token_type": "Bearer"}
            for k in ("scope", "client_id", "sub", "exp", "iat", "nbf", "iss", "aud", "jti", "fhirUser", "patient"):
                if k in claims:
                    out[k] = claims[k]
            if claims.get("sub") and claims.get("sub") != claims["client_id"]:
                out["username"] = claims["sub"]
            return out
        rec = await db.get_refresh(self.state.store, sha256(token))
        if rec is None or rec.used_at or rec.revoked_at or rec.expires_at < now_us():
            return {"active": False}
        await self.state.sync_revocations(force=True)
        if self.state.is_revoked(None, rec.grant_id, rec.client_id, rec.data.get("username", ""),
                                 int(rec.data.get("issued_at", 0))):
            return {"active": False}
        return {"active": True, "token_type": "refresh_token", "client_id": rec.client_id,
                "scope": " ".join(rec.data["scope"]), "sub": rec.data["username"], "username": rec.data["username"],
                "exp": rec.expires_at // 1_000_000, "iss": self.state.issuer(request.headers)}

    # ------------------------------------------------------------------ /oauth/userinfo, jwks, discovery

    async def userinfo(self, request: Request) -> Response:
        try:
            p = await self.state.authenticate(request.headers)
        except AuthError as e:
            return JSONResponse({"error": e.error, "error_description": e.description}, 401,
                                headers={"WWW-Authenticate": e.www_authenticate, **_NO_STORE})
        if "openid" not in p.scopes:
            return JSONResponse({"error": "insufficient_scope", "error_description": "userinfo needs openid"},
                                403, headers={"WWW-Authenticate": 'Bearer realm="dhp", error="insufficient_scope", '
                                                                  'scope="openid"', **_NO_STORE})
        out: dict[str, Any] = {"sub": p.sub}
        user = await db.get_user(self.state.store, p.sub)
        if user is not None:
            if "fhirUser" in p.scopes and user.fhir_user:
                out["fhirUser"] = user.fhir_user
            if "profile" in p.scopes:
                out["preferred_username"] = user.username
                if user.name:
                    out["name"] = user.name
        return JSONResponse(out, headers=_NO_STORE)

    async def jwks(self, request: Request) -> Response:
        await self.state.maybe_reload_keys()
        return JSONResponse(self.state.public_jwks, headers={"Cache-Control": "public, max-age=300"})

    def _discovery(self, request: Request) -> dict[str, Any]:
        iss = self.state.issuer(request.headers)
        return {
            "issuer": iss,
            "authorization_endpoint": f"{iss}/oauth/authorize",
            "token_endpoint": f"{iss}/oauth/token",
            "jwks_uri": f"{iss}/oauth/jwks",
            "userinfo_endpoint": f"{iss}/oauth/userinfo",
            "revocation_endpoint": f"{iss}/oauth/revoke",
            "introspection_endpoint": f"{iss}/oauth/introspect",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(GRANT_TYPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.state.alg],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "fhirUser", "profile", "launch/patient", "offline_access",
                                 "online_access", "patient/*.cruds", "user/*.cruds", "system/*.cruds",
                                 "patient/*.rs", "user/*.rs", "system/*.rs", "dhp/admin"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "name",
                                 "preferred_username"],
            "ui_locales_supported": list(i18n.LANGS),
            "authorization_response_iss_parameter_supported": True,
        }

    async def openid_configuration(self, request: Request) -> Response:
        return JSONResponse(self._discovery(request), headers=_PUBLIC_BY_HOST)

    async def smart_configuration(self, request: Request) -> Response:
        d = self._discovery(request)
        smart = {k: d[k] for k in ("issuer", "jwks_uri", "authorization_endpoint", "token_endpoint",
                                   "grant_types_supported", "scopes_supported", "response_types_supported",
                                   "code_challenge_methods_supported", "introspection_endpoint",
                                   "revocation_endpoint", "userinfo_endpoint")}
        smart["token_endpoint_auth_methods_supported"] = ["client_secret_basic", "client_secret_post"]
        smart["capabilities"] = [
            "launch-standalone", "client-public", "client-confidential-symmetric", "context-standalone-patient",
            "sso-openid-connect", "permission-offline", "permission-online", "permission-patient",
            "permission-user", "permission-v1", "permission-v2",
        ]
        return JSONResponse(smart, headers=_PUBLIC_BY_HOST)

    # ------------------------------------------------------------------ /oauth/authorize

    def _page(self, name: str, lang: str, status: int, lang_links: dict[str, str], **ctx: Any) -> HTMLResponse:
        t = i18n.MESSAGES[lang]
        titles = {"login.html": t["title_login"], "consent.html": t["title_consent"], "error.html": t["title_error"]}
        html = self.env.get_template(name).render(
            lang=lang, t=t, title=titles[name], languages=list(i18n.LANG_NAMES.items()), lang_links=lang_links, **ctx)
        return HTMLResponse(html, status, headers={
            **_NO_STORE, "X-Frame-Options": "DENY", "Content-Security-Policy":
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' http: https:; frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer"})

    @staticmethod
    def _lang_links(query: str) -> dict[str, str]:
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "ui_locales"]
        return {c: "/oauth/authorize?" + urlencode([*pairs, ("ui_locales", c)]) for c in i18n.LANGS}

    def _error_page(self, lang: str, error: str, description: str, status: int = 400,
                    query: str = "") -> HTMLResponse:
        return self._page("error.html", lang, status, self._lang_links(query), error=error, description=description)

    async def authorize(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._authorize_post(request)
        q = dict(request.query_params)
        query = request.url.query
        lang = i18n.pick_language(q.get("ui_locales"), request.headers.get("accept-language"))
        # One pass: re-parsing the query per parameter was quadratic (seconds of CPU for a long query).
        seen: set[str] = set()
        for k, _ in parse_qsl(query, keep_blank_values=True):
            if k in seen:
                return self._error_page(lang, "invalid_request", f"Parameter '{k}' is repeated", query=query)
            seen.add(k)
        client_id = q.get("client_id")
        if not client_id:
            return self._error_page(lang, "invalid_request", "Missing required parameter: client_id", query=query)
        client = await db.get_client(self.state.store, client_id)
        if client is None or client.revoked_at is not None:
            return self._error_page(lang, "invalid_client", "Unknown client", query=query)
        redirect_uri = q.get("redirect_uri")
        if redirect_uri is None and len(client.redirect_uris) == 1:
            redirect_uri = client.redirect_uris[0]
        if not redirect_uri or redirect_uri not in client.redirect_uris:
            # Never redirect to an unregistered URI (open redirector).
            return self._error_page(lang, "invalid_request", "redirect_uri is missing or not registered for "
                                    "this client", query=query)
        state = q.get("state")
        iss = self.state.issuer(request.headers)

        def back(error: str, description: str) -> Response:
            return _redirect(redirect_uri, {"error": error, "error_description": description, "state": state,
                                            "iss": iss})

        if q.get("response_type") != "code":
            return back("unsupported_response_type", "Only response_type=code is supported")
        if "authorization_code" not in client.grant_types:
            return back("unauthorized_client", "This client may not use the authorization_code grant")
        challenge, method = q.get("code_challenge"), q.get("code_challenge_method")
        if challenge is not None or method is not None:
            if method != "S256":
                return back("invalid_request", "code_challenge_method must be S256")
            if not challenge or not _CHALLENGE.fullmatch(challenge):
                return back("invalid_request", "code_challenge must be a base64url SHA-256 digest")
        elif client.public:
            return back("invalid_request", "PKCE (code_challenge with S256) is required for public clients")
        aud = q.get("aud")
        if aud and aud.rstrip("/") != self.state.fhir_base(request.headers) and not _same_base(
                aud, self.state.fhir_base(request.headers)):
            return back("invalid_request", "aud is not this server's FHIR base URL")
        if q.get("launch"):
            return back("invalid_request", "EHR launch is not supported; use standalone launch")
        requested = split_scope(q.get("scope")) or split_scope(client.scopes)
        try:
            validate_scopes(requested)
        except ScopeError as e:
            return back("invalid_scope", str(e))
        granted = grant(requested, split_scope(client.scopes), contexts=frozenset({"patient", "user"}),
                        extra=IDENTITY_SCOPES | ACCESS_SCOPES | {"launch/patient"})
        if not [s for s in granted if parse_resource_scope(s) is not None] and "openid" not in granted:
            return back("invalid_scope", "None of the requested scopes is allowed for this client")
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        now = int(time.time())
        req = {
            "typ": "dhp-authz", "jti": uuid.uuid4().hex, "client_id": client.client_id, "redirect_uri": redirect_uri,
            "scope": granted, "state": state, "nonce": q.get("nonce"), "code_challenge": challenge,
            "csrf": sha256(csrf), "q": query, "iat": now, "exp": now + REQUEST_LIFETIME,
        }
        request_token = self.state.sign(req, "dhp-authz")
        session = await self._session(request)
        if session is not None and q.get("prompt") != "login":
            user, auth_time = session
            resp = await self._consent_page(request, lang, client, req, request_token, csrf, user, auth_time)
        else:
            resp = self._page("login.html", lang, 200, self._lang_links(query), client_name=client.name,
                              action="/oauth/authorize", csrf=csrf, request_token=request_token, error=None,
                              username=None)
        self._set_csrf(resp, request, csrf)
        return resp

    def _set_csrf(self, resp: Response, request: Request, csrf: str) -> None:
        resp.set_cookie(CSRF_COOKIE, csrf, max_age=REQUEST_LIFETIME * 4, path="/oauth", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")

    async def _session(self, request: Request) -> tuple[db.UserRow, int] | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        claims = self._claims_ignoring_expiry(raw, "dhp-session")
        if claims is None or claims.get("typ") != "dhp-session" or int(claims.get("exp", 0)) <= time.time():
            return None
        user = await db.get_user(self.state.store, str(claims.get("sub")))
        if user is None or user.disabled or int(claims.get("pwd", 0)) != user.password_changed_at:
            return None
        return user, int(claims.get("auth_time", 0))

    def _scopes_for_user(self, user: db.UserRow, scope: list[str]) -> tuple[list[str], str | None, bool]:
        """(scopes this user may grant, patient context, whether a patient must be picked)."""
        out: list[str] = []
        patient = None
        if user.role == "patient" and user.fhir_user and user.fhir_user.startswith("Patient/"):
            patient = user.fhir_user.split("/", 1)[1]
        for s in scope:
            r = parse_resource_scope(s)
            if r is not None and r.context == "user" and user.role == "patient":
                continue  # a patient signs in for their own record only
            out.append(s)
        wants_patient = "launch/patient" in out or any(
            (r := parse_resource_scope(s)) is not None and r.context == "patient" for s in out)
        need_pick = wants_patient and patient is None and "launch/patient" in out
        if patient is None and not need_pick:
            out = [s for s in out if not ((r := parse_resource_scope(s)) is not None and r.context == "patient")]
        return out, patient, need_pick

    async def _consent_page(self, request: Request, lang: str, client: db.ClientRow, req: dict[str, Any],
                            request_token: str, csrf: str, user: db.UserRow, auth_time: int, *,
                            error: str | None = None, status: int = 200, patient: str | None = None,
                            ) -> HTMLResponse:
        scope, _, need_pick = self._scopes_for_user(user, req["scope"])
        now = int(time.time())
        ticket = self.state.sign({"typ": "dhp-ticket", "sub": user.username, "req": req["jti"],
                                  "auth_time": auth_time, "iat": now, "exp": now + TICKET_LIFETIME}, "dhp-ticket")
        return self._page("consent.html", lang, status, self._lang_links(req["q"]), client_name=client.name,
                          action="/oauth/authorize", csrf=csrf, request_token=request_token, ticket=ticket,
                          user_display=user.name or user.username, need_patient=need_pick, patient=patient,
                          scopes=[(s, i18n.describe_scope(s, lang)) for s in scope], error=error)

    async def _authorize_post(self, request: Request) -> Response:
        lang = i18n.pick_language(None, request.headers.get("accept-language"))
        try:
            form = await _form(request)
        except OAuthError as e:
            return self._error_page(lang, e.error, e.description)
        lang = i18n.pick_language(form.get("lang"), request.headers.get("accept-language"))
        t = i18n.MESSAGES[lang]
        req = self._claims_ignoring_expiry(form.get("request", ""), "dhp-authz")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        field = form.get("csrf_token", "")
        if (req is None or req.get("typ") != "dhp-authz" or int(req.get("exp", 0)) <= time.time()
                # Bytes: compare_digest raises TypeError on non-ASCII str, and both values come from the client.
                or not cookie or not hmac.compare_digest(cookie.encode(), field.encode())
                or not hmac.compare_digest(sha256(cookie), str(req.get("csrf")))):
            return self._error_page(lang, "access_denied", t["csrf"], 403)
        client = await db.get_client(self.state.store, req["client_id"])
        if client is None or client.revoked_at is not None:
            return self._error_page(lang, "invalid_client", "Unknown client", query=req["q"])
        iss = self.state.issuer(request.headers)
        step = form.get("step")
        if step == "login":
            return await self._login(request, form, lang, client, req, cookie)
        if step != "consent":
            return self._error_page(lang, "invalid_request", "Unknown form step", query=req["q"])
        ticket = self._claims_ignoring_expiry(form.get("ticket", ""), "dhp-ticket")
        if (ticket is None or ticket.get("typ") != "dhp-ticket" or ticket.get("req") != req["jti"]
                or int(ticket.get("exp", 0)) <= time.time()):
            return self._error_page(lang, "access_denied", t["csrf"], 403, query=req["q"])
        user = await db.get_user(self.state.store, str(ticket["sub"]))
        if user is None or user.disabled:
            return self._error_page(lang, "access_denied", t["bad_login"], 403, query=req["q"])
        if form.get("decision") != "allow":
            return _redirect(req["redirect_uri"], {"error": "access_denied", "state": req.get("state"),
                                                   "error_description": "The user denied the request", "iss": iss})
        scope, patient, need_pick = self._scopes_for_user(user, req["scope"])
        if need_pick:
            picked = (form.get("patient") or "").strip()
            if picked.startswith("Patient/"):
                picked = picked[len("Patient/"):]
            if not picked or not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", picked) or \
                    not await self.server.store.exists("Patient", picked):
                return await self._consent_page(request, lang, client, req, form["request"], cookie, user,
                                                int(ticket.get("auth_time", 0)), error=t["patient_missing"],
                                                status=400, patient=picked)
            patient = picked
        code = secrets.token_urlsafe(32)
        data = {"scope": scope, "username": user.username, "patient": patient, "nonce": req.get("nonce"),
                "code_challenge": req.get("code_challenge"), "auth_time": int(ticket.get("auth_time", 0)),
                "issued_at": int(time.time())}
        await db.insert_code(self.state.store, sha256(code), uuid.uuid4().hex, client.client_id,
                             req["redirect_uri"], data, now_us() + CODE_LIFETIME * 1_000_000)
        return _redirect(req["redirect_uri"], {"code": code, "state": req.get("state"), "iss": iss})

    async def _login(self, request: Request, form: dict[str, str], lang: str, client: db.ClientRow,
                     req: dict[str, Any], csrf: str) -> Response:
        t = i18n.MESSAGES[lang]
        username = (form.get("username") or "").strip()
        password = form.get("password") or ""
        addr = _address(request)
        # Usernames are at most 200 characters (auth_users): a longer one cannot sign in, but its failures
        # still count (under its first 200 characters, which fit the throttle's key).
        keys = {f"user:{username.lower()[:200]}": ACCOUNT_LIMIT, f"addr:{addr}": ADDRESS_LIMIT}

        def again(error: str, status: int) -> HTMLResponse:
            return self._page("login.html", lang, status, self._lang_links(req["q"]), client_name=client.name,
                              action="/oauth/authorize", csrf=csrf, request_token=form["request"], error=error,
                              username=username)

        state = await db.throttle_state(self.state.store, list(keys))
        now = now_us()
        if any(locked > now for _, _, locked in state.values()):
            await self.audit(kind="login", success=False, description="sign-in refused: too many failed attempts",
                             username=username or None, client_id=client.client_id, address=addr)
            return again(t["throttled"], 429)
        user = await db.get_user(self.state.store, username) if username else None
        ok = await verify_password_async(user.password_hash if user else _dummy_hash(), password)
        if user is None or not ok or user.disabled:
            await db.throttle_fail(self.state.store, keys, THROTTLE_WINDOW * 1_000_000, THROTTLE_LOCK * 1_000_000)
            await self.audit(kind="login", success=False, description="sign-in failed: wrong credentials or "
                             "disabled account", username=username or None, client_id=client.client_id,
                             address=addr)
            return again(t["bad_login"], 401)
        await db.throttle_clear(self.state.store, f"user:{username.lower()[:200]}")
        await self.audit(kind="login", success=True, description="user signed in", username=user.username,
                         fhir_user=user.fhir_user, client_id=client.client_id, client_name=client.name,
                         address=addr)
        auth_time = int(time.time())
        resp = await self._consent_page(request, lang, client, req, form["request"], csrf, user, auth_time)
        session = self.state.sign({"typ": "dhp-session", "sub": user.username, "auth_time": auth_time,
                                   "pwd": user.password_changed_at, "iat": auth_time,
                                   "exp": auth_time + SESSION_LIFETIME}, "dhp-session")
        resp.set_cookie(SESSION_COOKIE, session, max_age=SESSION_LIFETIME, path="/oauth", httponly=True,
                        samesite="lax", secure=request.url.scheme == "https")
        return resp


def _refresh_data(d: dict[str, Any]) -> dict[str, Any]:
    return {"scope": d["scope"], "username": d["username"], "patient": d.get("patient"),
            "auth_time": d.get("auth_time"), "issued_at": int(time.time())}


def _same_base(a: str, b: str) -> bool:
    return a.rstrip("/").split("://", 1)[-1] == b.rstrip("/").split("://", 1)[-1]


def _redirect(uri: str, params: Mapping[str, str | None]) -> RedirectResponse:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(k, v) for k, v in params.items() if v is not None]
    return RedirectResponse(urlunsplit(parts._replace(query=urlencode(query))), 303, headers=_NO_STORE)


def routes(server: Any) -> list[BaseRoute]:
    from dhp.auth.admin import admin_routes

    e = Endpoints(server)
    return [
        Route("/oauth/token", e.token, methods=["POST"]),
        Route("/oauth/authorize", e.authorize, methods=["GET", "POST"]),
        Route("/oauth/revoke", e.revoke, methods=["POST"]),
        Route("/oauth/introspect", e.introspect, methods=["POST"]),
        Route("/oauth/userinfo", e.userinfo, methods=["GET", "POST"]),
        Route("/oauth/jwks", e.jwks, methods=["GET"]),
        Route("/.well-known/openid-configuration", e.openid_configuration, methods=["GET"]),
        Route("/.well-known/smart-configuration", e.smart_configuration, methods=["GET"]),
        Route("/fhir/.well-known/smart-configuration", e.smart_configuration, methods=["GET"]),
        *admin_routes(server),
    ]
