"""The per-process SSO state: signing keys, token issue and verification, revocation, clients, passwords.

Keys live in the database (``auth_keys``) so every stateless process signs and verifies with the same set;
they are parsed once into joserfc key objects. Verification needs nothing but those keys and a revocation
set that each process refreshes from the database at most every :data:`REVOCATION_POLL` seconds (a process
that revokes a token sees it at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from dhp.auth.scopes import Principal
from dhp.auth.signer import ProcessSigner
from dhp.errors import FHIRError, Issue
from dhp.store import Store, now_us
from dhp.store import auth as db

log = logging.getLogger("dhp.auth")

REVOCATION_POLL = 1.0  # seconds between revocation syncs per process
CLIENT_TTL = 1.0  # seconds a client row stays cached per process (token issue must not wait on the DB)
KEY_RELOAD = 60.0  # seconds between checks for keys another process added
KEY_RETRY = 1.0  # at least this long between reloads prompted by a token naming a key we do not hold
REFRESH_LIFETIME = 30 * 24 * 3600  # seconds
CODE_LIFETIME = 60  # seconds: an authorization code dies fast
KEY_GRACE = 2 * 24 * 3600  # retired keys stay in the JWKS this long after retirement (> token lifetime)
ALGS = ("RS256", "ES256")
_CACHE_MAX = 20000
# OWASP's argon2id baseline (19 MiB, 2 passes, 1 lane): the library default (64 MiB, 3 passes, 4 lanes)
# took 0.6 s per sign-in on a 2-core box. Hashing runs in a worker thread, never on the event loop.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


class AuthError(FHIRError):
    """A bearer token that does not authenticate: 401 with ``WWW-Authenticate`` per RFC 6750."""

    def __init__(self, description: str, *, error: str = "invalid_token", code: str = "login") -> None:
        # The issue asks for error="invalid_token" on a missing token too (RFC 6750 leaves it optional).
        value = f'Bearer realm="dhp", error="{error}", error_description="{description}"'
        self.www_authenticate = value
        self.error = error
        self.description = description
        super().__init__(401, description, code, message_id=f"auth-{error}",
                         issues=[Issue("error", code, description, message_id=f"auth-{error}")],
                         headers={"WWW-Authenticate": value})


def sha256(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def verify_password_async(hashed: str, password: str) -> bool:
    return await asyncio.to_thread(verify_password, hashed, password)


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(hash_password, password)


def verify_client_secret(client: db.ClientRow, secret: str) -> bool:
    # Client secrets are 256-bit random strings: a fast hash is enough (argon2 is for guessable passwords)
    # and keeps client_credentials cheap.
    return client.secret_hash is not None and hmac.compare_digest(client.secret_hash, sha256(secret))


def _import_key(alg: str, jwk: dict[str, Any]) -> RSAKey | ECKey:
    return RSAKey.import_key(jwk) if alg == "RS256" else ECKey.import_key(jwk)


def _generate_key(alg: str) -> RSAKey | ECKey:
    kid = uuid.uuid4().hex
    params = {"kid": kid, "alg": alg, "use": "sig"}
    if alg == "RS256":
        return RSAKey.generate_key(2048, parameters=params, private=True)
    return ECKey.generate_key("P-256", parameters=params, private=True)


class AuthState:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.store: Store = server.store
        self.alg = getattr(server.settings, "token_alg", "RS256") or "RS256"
        if self.alg not in ALGS:
            raise ValueError(f"DHP_TOKEN_ALG must be one of {', '.join(ALGS)}")
        self.lifetime = int(server.settings.token_lifetime)
        mode = getattr(server.settings, "token_signer", "process") or "process"
        if mode not in ("process", "inline"):
            raise ValueError("DHP_TOKEN_SIGNER must be 'process' or 'inline'")
        self.signer = ProcessSigner(jwt.encode) if mode == "process" else None
        self.keyset = KeySet([])
        self.signing: dict[str, RSAKey | ECKey] = {}  # alg → active key
        self.public_jwks: dict[str, Any] = {"keys": []}
        self.keys_loaded_at = 0.0
        self.revoked: dict[str, int] = {}  # key → revoked-at (µs)
        self.rev_synced_at = 0.0
        self.rev_seen = 0  # created_at high-water mark (µs)
        self._rev_lock = asyncio.Lock()
        self._key_lock = asyncio.Lock()
        self.cache: dict[str, Principal] = {}
        self._clients: dict[str, tuple[float, db.ClientRow | None]] = {}
        self.compartments: Any = None
        self.audit: Any = None

    # ------------------------------------------------------------------ keys

    async def load_keys(self, *, create: bool = True) -> None:
        async with self._key_lock:
            rows = await db.load_keys(self.store)
            if create and not any(r["alg"] == self.alg and r["retired_at"] is None for r in rows):
                await self._add_key(self.alg, retire_others=False)
                rows = await db.load_keys(self.store)
            self._install(rows)

    def _install(self, rows: list[dict[str, Any]]) -> None:
        keys: list[RSAKey | ECKey] = []
        signing: dict[str, RSAKey | ECKey] = {}
        cutoff = now_us() - KEY_GRACE * 1_000_000
        for r in rows:
            if r["retired_at"] is not None and r["retired_at"] < cutoff:
                continue
            k = _import_key(r["alg"], json.loads(r["jwk"]))
            keys.append(k)
            if r["retired_at"] is None:
                signing[r["alg"]] = k  # rows come oldest first: the newest active key wins
        self.keyset = KeySet(keys)
        self.signing = signing
        self.public_jwks = {"keys": [k.as_dict(private=False) for k in keys]}
        self.keys_loaded_at = time.monotonic()

    async def _add_key(self, alg: str, *, retire_others: bool) -> str:
        key = _generate_key(alg)
        await db.add_key(self.store, str(key.kid), alg, json.dumps(key.as_dict(private=True)),
                         retire_others=retire_others)
        return str(key.kid)

    async def rotate_keys(self) -> str:
        """Make a new signing key; the old ones stay in the JWKS until tokens signed with them expired."""
        kid = await self._add_key(self.alg, retire_others=True)
        await db.drop_keys_retired_before(self.store, now_us() - KEY_GRACE * 1_000_000)
        await self.load_keys(create=False)
        return kid

    async def maybe_reload_keys(self) -> None:
        if time.monotonic() - self.keys_loaded_at > KEY_RELOAD:
            await self.load_keys(create=False)

    def _key(self) -> RSAKey | ECKey:
        key = self.signing.get(self.alg)
        if key is None:
            raise RuntimeError("no signing key loaded")
        return key

    def sign(self, claims: dict[str, Any], typ: str = "JWT") -> str:
        key = self._key()
        return jwt.encode({"alg": self.alg, "kid": str(key.kid), "typ": typ}, claims, key)

    async def sign_async(self, claims: dict[str, Any], typ: str = "JWT") -> str:
        """:meth:`sign` for the tokens the SSO issues: RSA signatures go to the signer child process
        (:mod:`dhp.auth.signer`, ``DHP_TOKEN_SIGNER=process``); ES256 is cheaper than the hop."""
        if self.signer is None or not self.alg.startswith("RS"):
            return self.sign(claims, typ)
        key = self._key()
        return await self.signer.sign({"alg": self.alg, "kid": str(key.kid), "typ": typ}, claims, key)

    async def close(self) -> None:
        if self.signer is not None:
            await self.signer.close()

    def decode(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(header, claims) of a token signed by one of our keys; JoseError/ValueError otherwise."""
        t = jwt.decode(token, self.keyset, algorithms=list(ALGS))
        return dict(t.header), dict(t.claims)

    # ------------------------------------------------------------------ clients

    async def client(self, client_id: str) -> db.ClientRow | None:
        """The client row, cached for :data:`CLIENT_TTL`; a revocation this process knows of wins at once."""
        now = time.monotonic()
        hit = self._clients.get(client_id)
        if hit is not None and now - hit[0] < CLIENT_TTL:
            row = hit[1]
        else:
            row = await db.get_client(self.store, client_id)
            if len(self._clients) >= _CACHE_MAX:
                self._clients.clear()
            self._clients[client_id] = (now, row)
        if row is not None and row.revoked_at is None and f"client:{client_id}" in self.revoked:
            return None  # revoked since we cached it (revocation is final)
        return row

    def forget_client(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    # ------------------------------------------------------------------ base URLs

    def issuer(self, headers: Mapping[str, str] | None = None) -> str:
        base = self.server.settings.base_url.rstrip("/")
        if base:
            return base[: -len("/fhir")] if base.endswith("/fhir") else base
        return _origin(headers or {})

    def fhir_base(self, headers: Mapping[str, str] | None = None) -> str:
        base = self.server.settings.base_url.rstrip("/")
        if base:
            return base
        return _origin(headers or {}) + "/fhir"

    def security_component(self, fhir_base: str) -> dict[str, Any]:
        """``CapabilityStatement.rest.security``: SMART on FHIR with the OAuth URLs (oauth-uris extension)."""
        base = fhir_base.rstrip("/")
        iss = self.server.settings.base_url.rstrip("/") or base
        if iss.endswith("/fhir"):
            iss = iss[: -len("/fhir")]
        uris = [("authorize", "/oauth/authorize"), ("token", "/oauth/token"), ("revoke", "/oauth/revoke"),
                ("introspect", "/oauth/introspect")]
        return {
            "cors": True,
            "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                     "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                         "text": "OAuth 2.0 / OpenID Connect with SMART App Launch v2 scopes"}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": k, "valueUri": iss + p} for k, p in uris],
            }],
            "description": "Every request but /metadata and the SMART discovery document needs "
                           "'Authorization: Bearer <access token>' from this server's SSO; see "
                           f"{base}/.well-known/smart-configuration",
        }

    # ------------------------------------------------------------------ access tokens

    async def issue_access_token(self, *, headers: Mapping[str, str], client_id: str, sub: str, scope: list[str],
                           fhir_user: str | None, patient: str | None, grant_id: str | None,
                           ) -> tuple[str, dict[str, Any]]:
        now = int(time.time())
        jti = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": self.issuer(headers), "aud": self.fhir_base(headers), "sub": sub, "client_id": client_id,
            "scope": " ".join(scope), "iat": now, "nbf": now - 1, "exp": now + self.lifetime, "jti": jti,
        }
        if fhir_user:
            claims["fhirUser"] = fhir_user
        if patient:
            claims["patient"] = patient
        if grant_id:
            claims["gid"] = grant_id
        return await self.sign_async(claims, "at+jwt"), claims

    async def issue_id_token(self, *, headers: Mapping[str, str], client_id: str, sub: str, fhir_user: str | None,
                       nonce: str | None, auth_time: int | None, name: str | None, with_fhir_user: bool) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer(headers), "aud": client_id, "sub": sub, "iat": now,
                                  "exp": now + self.lifetime, "azp": client_id}
        if nonce:
            claims["nonce"] = nonce
        if auth_time:
            claims["auth_time"] = auth_time
        if fhir_user and with_fhir_user:
            claims["fhirUser"] = fhir_user
        if name:
            claims["name"] = name
            claims["preferred_username"] = sub
        return await self.sign_async(claims)

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        value = header(headers, "authorization")
        if not value:
            raise AuthError("an access token is required (Authorization: Bearer ...)")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <access token>'")
        await self.sync_revocations()
        # The audience and issuer were checked against the FHIR base this request's headers give (Host, but also
        # X-Forwarded-Host/-Proto): that base, not the Host header alone, is part of the cache key.
        ck = self.fhir_base(headers) + " " + token
        p = self.cache.get(ck)
        if p is None:
            p = await self._verify(token, headers)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[ck] = p
        if p.expires_at <= time.time():
            self.cache.pop(ck, None)
            raise AuthError("the access token has expired", code="expired")
        if self.is_revoked(p.jti, p.grant_id, p.client_id, p.sub, p.issued_at):
            raise AuthError("the access token has been revoked")
        return p

    async def _verify(self, token: str, headers: Mapping[str, str]) -> Principal:
        try:
            header, claims = self.decode(token)
        except (JoseError, ValueError) as e:
            if "kid" in str(e).lower() or "key" in str(e).lower():
                # Perhaps another process rotated keys since we loaded them. Not more than once a KEY_RETRY:
                # tokens naming made-up keys would otherwise cost a database query each.
                if time.monotonic() - self.keys_loaded_at >= KEY_RETRY:
                    await self.load_keys(create=False)
                try:
                    header, claims = self.decode(token)
                except (JoseError, ValueError):
                    raise AuthError("the access token's signature is invalid") from e
            else:
                raise AuthError("the access token is malformed or its signature is invalid") from e
        if header.get("typ") != "at+jwt" or "client_id" not in claims:
            raise AuthError("not an access token")
        if claims.get("iss") != self.issuer(headers) and not _same_ignoring_scheme(claims.get("iss"),
                                                                                    self.issuer(headers)):
            raise AuthError("the access token was issued by another server")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        want = self.fhir_base(headers)
        if not any(a == want or _same_ignoring_scheme(a, want) for a in auds if isinstance(a, str)):
            raise AuthError("the access token is for another audience")
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= time.time():
            raise AuthError("the access token has expired", code="expired")
        scopes = str(claims.get("scope", "")).split()
        return Principal(client_id=str(claims["client_id"]), sub=str(claims.get("sub", "")), scopes=scopes,
                         fhir_user=claims.get("fhirUser"), patient=claims.get("patient"), jti=claims.get("jti"),
                         grant_id=claims.get("gid"), expires_at=exp, issued_at=int(claims.get("iat", 0)))

    # ------------------------------------------------------------------ revocation

    def is_revoked(self, jti: str | None, grant_id: str | None, client_id: str, sub: str, iat: int) -> bool:
        if not self.revoked:
            return False
        iat_us = iat * 1_000_000
        keys = [f"jti:{jti}", f"grant:{grant_id}", f"client:{client_id}"]
        if sub != client_id:  # a user's token (client_credentials tokens carry the client id as sub)
            keys.append(f"sub:{sub}")
        for key in keys:
            at = self.revoked.get(key)
            if at is not None and iat_us <= at:
                return True
        return False

    async def sync_revocations(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.rev_synced_at < REVOCATION_POLL:
            return
        async with self._rev_lock:
            if not force and time.monotonic() - self.rev_synced_at < REVOCATION_POLL:
                return
            # Look back a few seconds: on PostgreSQL rows can commit out of created_at order.
            since = self.rev_seen - 10_000_000
            rows = await db.revocations_since(self.store, since)
            for key, at in rows:
                if at > self.revoked.get(key, -1):
                    self.revoked[key] = at
            if rows:
                self.rev_seen = max(self.rev_seen, max(at for _, at in rows))
            self.rev_synced_at = time.monotonic()

    def note_revocation(self, key: str, at: int) -> None:
        """Apply a revocation this process just wrote, without waiting for the next sync."""
        if at > self.revoked.get(key, -1):
            self.revoked[key] = at

    def revocation_expiry(self) -> int:
        return now_us() + (self.lifetime + 60) * 1_000_000

    async def revoke_access_token(self, jti: str, exp: int) -> None:
        at = await db.add_revocation(self.store, f"jti:{jti}", (exp + 60) * 1_000_000)
        self.note_revocation(f"jti:{jti}", at)

    async def revoke_grant(self, grant_id: str) -> None:
        await db.revoke_grant(self.store, grant_id, self.revocation_expiry())
        self.note_revocation(f"grant:{grant_id}", now_us())

    async def revoke_client(self, client_id: str) -> bool:
        ok = await db.revoke_client(self.store, client_id, self.revocation_expiry())
        self.forget_client(client_id)
        if ok:
            self.note_revocation(f"client:{client_id}", now_us())
        return ok

    async def disable_user(self, username: str) -> bool:
        ok = await db.disable_user(self.store, username, self.revocation_expiry())
        if ok:
            self.note_revocation(f"sub:{username}", now_us())
        return ok


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header from Starlette's case-insensitive Headers or from a plain dict in any common casing."""
    v = headers.get(name)
    if v is None and not hasattr(headers, "getlist"):
        v = headers.get(name.title()) or next((x for k, x in headers.items() if k.lower() == name), None)
    return v


#: RFC 3986 host (a name or an IPv6 literal) and optional port: what a Host header may hold.
_HOST = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _origin(headers: Mapping[str, str]) -> str:
    """The public origin when DHP_BASE_URL is not set, from the (proxy's) headers. A value that is not a host
    (``a"b<script>``) is passed over: it would otherwise be echoed into issuer, audience and discovery."""
    host = "localhost"
    for cand in (header(headers, "x-forwarded-host"), header(headers, "host")):
        first = cand.split(",")[0].strip() if cand else ""
        if first and _HOST.fullmatch(first):
            host = first
            break
    proto = (header(headers, "x-forwarded-proto") or "http").split(",")[0].strip().lower()
    return f"{proto if proto in ('http', 'https') else 'http'}://{host}"


def _same_ignoring_scheme(a: Any, b: str) -> bool:
    # Without a configured base URL the scheme behind a proxy is a guess; host and path must still match.
    return isinstance(a, str) and a.split("://", 1)[-1] == b.split("://", 1)[-1]


async def create_client(store: Store, *, name: str, scopes: str, public: bool = False,
                        redirect_uris: list[str] | None = None, grant_types: list[str] | None = None,
                        organization: str | None = None, admin: bool = False,
                        client_id: str | None = None) -> dict[str, Any]:
    """Register a client; returns ``{"client_id", "client_secret"?}`` (the secret is shown only now)."""
    from dhp.auth.scopes import ScopeError, split_scope, validate_scopes

    if not name.strip():
        raise ValueError("a client needs a name")
    try:
        validate_scopes(split_scope(scopes))
    except ScopeError as e:
        raise ValueError(str(e)) from e
    redirect_uris = list(redirect_uris or [])
    for u in redirect_uris:
        if not (u.startswith("https://") or u.startswith("http://")) or "#" in u:
            raise ValueError(f"redirect URI {u!r} must be an absolute http(s) URL without a fragment")
    if grant_types is None:
        grant_types = ["authorization_code", "refresh_token"] if redirect_uris else []
        if not public:
            grant_types.append("client_credentials")
    for g in grant_types:
        if g not in ("authorization_code", "client_credentials", "refresh_token"):
            raise ValueError(f"unknown grant type {g!r}")
    if not grant_types:
        raise ValueError("the client can use no grant: give a redirect URI (authorization_code) or make it "
                         "confidential (client_credentials)")
    if public and "client_credentials" in grant_types:
        raise ValueError("a public client cannot use client_credentials")
    if "authorization_code" in grant_types and not redirect_uris:
        raise ValueError("the authorization_code grant needs at least one redirect URI")
    if organization and not organization.startswith("Organization/"):
        raise ValueError("organization must be a reference like Organization/ID")
    client_id = client_id or uuid.uuid4().hex
    secret = None if public else new_secret()
    await db.insert_client(store, db.ClientRow(
        client_id=client_id, name=name.strip(), secret_hash=sha256(secret) if secret else None, public=public,
        redirect_uris=redirect_uris, grant_types=grant_types, scopes=" ".join(split_scope(scopes)),
        organization=organization, admin=admin, created_at=now_us(), revoked_at=None))
    out: dict[str, Any] = {"client_id": client_id}
    if secret:
        out["client_secret"] = secret
    return out


async def rotate_client_secret(store: Store, client_id: str) -> str | None:
    secret = new_secret()
    return secret if await db.set_client_secret(store, client_id, sha256(secret)) else None


def role_of(fhir_user: str | None, role: str | None) -> str:
    if role:
        if role not in ("practitioner", "patient", "admin"):
            raise ValueError("role must be practitioner, patient or admin")
        return role
    if fhir_user and fhir_user.startswith("Patient/"):
        return "patient"
    return "practitioner"


async def create_user(store: Store, *, username: str, password: str, fhir_user: str | None = None,
                      role: str | None = None, name: str | None = None) -> dict[str, Any]:
    username = username.strip()
    if not username or len(username) > 200 or any(c.isspace() for c in username):
        raise ValueError("a username is 1-200 characters without spaces")
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    if fhir_user is not None:
        rtype, _, rid = fhir_user.partition("/")
        if rtype not in ("Practitioner", "Patient", "PractitionerRole", "RelatedPerson", "Person") or not rid:
            raise ValueError("fhirUser must be a reference like Practitioner/ID or Patient/ID")
    r = role_of(fhir_user, role)
    if await db.get_user(store, username) is not None:
        raise ValueError(f"user {username!r} exists")
    ts = now_us()
    hashed = await hash_password_async(password)
    await db.insert_user(store, db.UserRow(username, hashed, fhir_user, r, name, False, ts, ts))
    return {"username": username, "fhir_user": fhir_user, "role": r}
