"""Tables and SQL of the SSO (``dhp.auth``): signing keys, clients, users, codes, refresh tokens,
revocations and login throttling. Migration ``0100_auth`` creates them; keep both in step.

Everything the SSO needs to share between processes lives here, so any API process can verify tokens and
enforce revocation with no state but the database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)

from dhp.store import (
    Store,
    StoredResource,
    WriteTx,
    now_us,
)
from dhp.store.schema import BigId, metadata

#: JWS signing keys (private JWK as JSON). ``retired_at`` set: no longer signs, still published in the JWKS.
auth_keys = Table(
    "auth_keys", metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("jwk", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("retired_at", BigInteger, nullable=True),
)

#: OAuth clients. ``secret_hash`` is SHA-256 of a 256-bit random secret (NULL for public clients).
auth_clients = Table(
    "auth_clients", metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("secret_hash", String(128), nullable=True),
    Column("public", Boolean, nullable=False),
    Column("redirect_uris", Text, nullable=False),  # JSON array
    Column("grant_types", Text, nullable=False),  # JSON array
    Column("scopes", Text, nullable=False),  # space-separated allowed scopes
    Column("organization", String(200), nullable=True),  # Organization/ID that owns the client
    Column("admin", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

#: People who sign in: practitioners, patients, administrators.
auth_users = Table(
    "auth_users", metadata,
    Column("username", String(200), primary_key=True),
    Column("password_hash", String(300), nullable=False),  # argon2id
    Column("fhir_user", String(200), nullable=True),  # Practitioner/ID, Patient/ID, …
    Column("role", String(32), nullable=False),  # practitioner | patient | admin
    Column("name", String(200), nullable=True),
    Column("disabled", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("password_changed_at", BigInteger, nullable=False),
)

#: Authorization codes (SHA-256 of the code). Single use: ``used_at`` is set atomically on exchange.
auth_codes = Table(
    "auth_codes", metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("grant_id", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("data", Text, nullable=False),  # JSON: scope, username, fhir_user, patient, nonce, pkce…
    Column("expires_at", BigInteger, nullable=False),
    Column("used_at", BigInteger, nullable=True),
)

#: Refresh tokens (SHA-256 of the token). A family shares ``grant_id``; reuse of a rotated one revokes it.
auth_refresh_tokens = Table(
    "auth_refresh_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("grant_id", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("data", Text, nullable=False),  # JSON: scope, sub, fhir_user, patient, …
    Column("expires_at", BigInteger, nullable=False),
    Column("used_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
    Index("ix_auth_refresh_grant", "grant_id"),
)

#: Revocations every process polls: key is ``jti:…``, ``grant:…``, ``client:…`` or ``sub:…``; a token whose
#: ``iat`` is not after ``at`` is dead. Rows can go once ``expires_at`` passed (no token outlives it).
auth_revocations = Table(
    "auth_revocations", metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("key", String(200), nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_auth_revocations_created", "created_at"),
)

#: Failed sign-ins per account (``user:NAME``) and per address (``addr:IP``) in the current window.
auth_throttle = Table(
    "auth_throttle", metadata,
    Column("key", String(250), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_start", BigInteger, nullable=False),
    Column("locked_until", BigInteger, nullable=False),
)


# ---------------------------------------------------------------------------------------------- keys

async def load_keys(store: Store) -> list[dict[str, Any]]:
    q = select(auth_keys).order_by(auth_keys.c.created_at)
    async with store.read_conn() as conn:
        return [dict(r._mapping) for r in (await conn.execute(q)).all()]


async def add_key(store: Store, kid: str, alg: str, jwk: str, *, retire_others: bool) -> None:
    ts = now_us()
    async with store.begin() as tx:
        if retire_others:
            await tx.conn.execute(update(auth_keys).where(auth_keys.c.alg == alg,
                                                          auth_keys.c.retired_at.is_(None))
                                  .values(retired_at=ts))
        await tx.conn.execute(insert(auth_keys).values(kid=kid, alg=alg, jwk=jwk, created_at=ts,
                                                       retired_at=None))


async def drop_keys_retired_before(store: Store, before_us: int) -> int:
    async with store.begin() as tx:
        r = await tx.conn.execute(delete(auth_keys).where(auth_keys.c.retired_at.is_not(None),
                                                          auth_keys.c.retired_at < before_us))
    return r.rowcount or 0


# ---------------------------------------------------------------------------------------------- clients

@dataclass
class ClientRow:
    client_id: str
    name: str
    secret_hash: str | None
    public: bool
    redirect_uris: list[str]
    grant_types: list[str]
    scopes: str
    organization: str | None
    admin: bool
    created_at: int
    revoked_at: int | None

    def public_view(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "name": self.name, "public": self.public,
                "redirect_uris": self.redirect_uris, "grant_types": self.grant_types, "scope": self.scopes,
                "organization": self.organization, "admin": self.admin,
                "created_at": self.created_at, "revoked": self.revoked_at is not None}


def _client(r: Any) -> ClientRow:
    m = r._mapping
    return ClientRow(m["client_id"], m["name"], m["secret_hash"], bool(m["public"]),
                     json.loads(m["redirect_uris"]), json.loads(m["grant_types"]), m["scopes"],
                     m["organization"], bool(m["admin"]), m["created_at"], m["revoked_at"])


async def insert_client(store: Store, c: ClientRow) -> None:
    async with store.begin() as tx:
        await tx.conn.execute(insert(auth_clients).values(
            client_id=c.client_id, name=c.name, secret_hash=c.secret_hash, public=c.public,
            redirect_uris=json.dumps(c.redirect_uris), grant_types=json.dumps(c.grant_types), scopes=c.scopes,
            organization=c.organization, admin=c.admin, created_at=c.created_at, revoked_at=c.revoked_at))


async def get_client(store: Store, client_id: str) -> ClientRow | None:
    async with store.read_conn() as conn:
        r = (await conn.execute(select(auth_clients).where(auth_clients.c.client_id == client_id))).first()
    return _client(r) if r else None


async def list_clients(store: Store) -> list[ClientRow]:
    async with store.read_conn() as conn:
        rows = (await conn.execute(select(auth_clients).order_by(auth_clients.c.created_at))).all()
    return [_client(r) for r in rows]


async def count_clients(store: Store, *, admin_only: bool = False) -> int:
    q = select(func.count()).select_from(auth_clients)
    if admin_only:
        q = q.where(auth_clients.c.admin == literal(True))
    async with store.read_conn() as conn:
        return int((await conn.execute(q)).scalar_one())


async def revoke_client(store: Store, client_id: str, expires_at: int) -> bool:
    """Mark the client revoked and kill every token it holds (refresh tokens and, by revocation, JWTs)."""
    ts = now_us()
    async with store.begin() as tx:
        r = await tx.conn.execute(update(auth_clients).where(auth_clients.c.client_id == client_id,
                                                             auth_clients.c.revoked_at.is_(None))
                                  .values(revoked_at=ts))
        if not r.rowcount:
            return False
        await tx.conn.execute(update(auth_refresh_tokens).where(auth_refresh_tokens.c.client_id == client_id,
                                                                auth_refresh_tokens.c.revoked_at.is_(None))
                              .values(revoked_at=ts))
        await tx.conn.execute(insert(auth_revocations).values(key=f"client:{client_id}", at=ts, created_at=ts,
                                                              expires_at=expires_at))
    return True


async def set_client_secret(store: Store, client_id: str, secret_hash: str) -> bool:
    async with store.begin() as tx:
        r = await tx.conn.execute(update(auth_clients).where(auth_clients.c.client_id == client_id,
                                                             auth_clients.c.revoked_at.is_(None),
                                                             auth_clients.c.public == literal(False))
                                  .values(secret_hash=secret_hash))
    return bool(r.rowcount)


# ---------------------------------------------------------------------------------------------- users

@dataclass
class UserRow:
    username: str
    password_hash: str
    fhir_user: str | None
    role: str
    name: str | None
    disabled: bool
    created_at: int
    password_changed_at: int

    def public_view(self) -> dict[str, Any]:
        return {"username": self.username, "fhir_user": self.fhir_user, "role": self.role, "name": self.name,
                "disabled": self.disabled, "created_at": self.created_at}


def _user(r: Any) -> UserRow:
    m = r._mapping
    return UserRow(m["username"], m["password_hash"], m["fhir_user"], m["role"], m["name"], bool(m["disabled"]),
                   m["created_at"], m["password_changed_at"])


async def insert_user(store: Store, u: UserRow) -> None:
    async with store.begin() as tx:
        await tx.conn.execute(insert(auth_users).values(
            username=u.username, password_hash=u.password_hash, fhir_user=u.fhir_user, role=u.role, name=u.name,
            disabled=u.disabled, created_at=u.created_at, password_changed_at=u.password_changed_at))


async def get_user(store: Store, username: str) -> UserRow | None:
    async with store.read_conn() as conn:
        r = (await conn.execute(select(auth_users).where(auth_users.c.username == username))).first()
    return _user(r) if r else None


async def list_users(store: Store) -> list[UserRow]:
    async with store.read_conn() as conn:
        rows = (await conn.execute(select(auth_users).order_by(auth_users.c.username))).all()
    return [_user(r) for r in rows]


async def disable_user(store: Store, username: str, expires_at: int) -> bool:
    """Disable the account and revoke every token issued to it."""
    ts = now_us()
    async with store.begin() as tx:
        r = await tx.conn.execute(update(auth_users).where(auth_users.c.username == username)
                                  .values(disabled=True))
        if not r.rowcount:
            return False
        await tx.conn.execute(insert(auth_revocations).values(key=f"sub:{username}", at=ts, created_at=ts,
                                                              expires_at=expires_at))
    return True


async def set_user_password(store: Store, username: str, password_hash: str) -> bool:
    async with store.begin() as tx:
        r = await tx.conn.execute(update(auth_users).where(auth_users.c.username == username)
                                  .values(password_hash=password_hash, password_changed_at=now_us()))
    return bool(r.rowcount)


# ---------------------------------------------------------------------------------------------- codes

async def insert_code(store: Store, code_hash: str, grant_id: str, client_id: str, redirect_uri: str,
                      data: dict[str, Any], expires_at: int) -> None:
    async with store.begin() as tx:
        await tx.conn.execute(insert(auth_codes).values(
            code_hash=code_hash, grant_id=grant_id, client_id=client_id, redirect_uri=redirect_uri,
            data=json.dumps(data), expires_at=expires_at, used_at=None))
        # Codes live 60 s at most: sweep the dead ones while we are here.
        await tx.conn.execute(delete(auth_codes).where(auth_codes.c.expires_at < now_us() - 3_600_000_000))


@dataclass
class CodeRow:
    grant_id: str
    client_id: str
    redirect_uri: str
    data: dict[str, Any]
    expires_at: int
    replayed: bool  # the code had been used before: the caller must revoke its grant


async def consume_code(store: Store, code_hash: str, client_id: str) -> CodeRow | None:
    """Mark the code used by ``client_id``. Exactly one caller sees ``replayed=False`` for a code. A code
    presented by another client is returned unused: another client holding a stolen code must not be able to
    burn it (and make the rightful client's use look like a replay that revokes its grant)."""
    ts = now_us()
    async with store.begin() as tx:
        row = (await tx.conn.execute(select(auth_codes).where(auth_codes.c.code_hash == code_hash))).first()
        if row is None:
            return None
        m = row._mapping
        if m["client_id"] != client_id:
            return CodeRow(m["grant_id"], m["client_id"], m["redirect_uri"], {}, m["expires_at"], replayed=False)
        r = await tx.conn.execute(update(auth_codes).where(auth_codes.c.code_hash == code_hash,
                                                           auth_codes.c.used_at.is_(None)).values(used_at=ts))
        return CodeRow(m["grant_id"], m["client_id"], m["redirect_uri"], json.loads(m["data"]), m["expires_at"],
                       replayed=not r.rowcount)


# ---------------------------------------------------------------------------------------------- refresh tokens

async def insert_refresh(store: Store, token_hash: str, grant_id: str, client_id: str, data: dict[str, Any],
                         expires_at: int) -> None:
    async with store.begin() as tx:
        await tx.conn.execute(insert(auth_refresh_tokens).values(
            token_hash=token_hash, grant_id=grant_id, client_id=client_id, data=json.dumps(data),
            expires_at=expires_at, used_at=None, revoked_at=None))


@dataclass
class RefreshRow:
    token_hash: str
    grant_id: str
    client_id: str
    data: dict[str, Any]
    expires_at: int
    used_at: int | None
    revoked_at: int | None


def _refresh(r: Any) -> RefreshRow:
    m = r._mapping
    return RefreshRow(m["token_hash"], m["grant_id"], m["client_id"], json.loads(m["data"]), m["expires_at"],
                      m["used_at"], m["revoked_at"])


async def get_refresh(store: Store, token_hash: str) -> RefreshRow | None:
    async with store.read_conn() as conn:
        r = (await conn.execute(select(auth_refresh_tokens)
                                .where(auth_refresh_tokens.c.token_hash == token_hash))).first()
    return _refresh(r) if r else None


async def rotate_refresh(store: Store, token_hash: str, new_hash: str, data: dict[str, Any],
                         expires_at: int) -> tuple[RefreshRow | None, bool]:
    """Use a refresh token: mark it used and store its successor in one transaction.

    Returns (row, reused). ``reused`` means it had been used or revoked already: no successor is stored and
    the caller revokes the family.
    """
    ts = now_us()
    async with store.begin() as tx:
        row = (await tx.conn.execute(select(auth_refresh_tokens)
                                     .where(auth_refresh_tokens.c.token_hash == token_hash))).first()
        if row is None:
            return None, False
        rec = _refresh(row)
        r = await tx.conn.execute(update(auth_refresh_tokens).where(
            auth_refresh_tokens.c.token_hash == token_hash, auth_refresh_tokens.c.used_at.is_(None),
            auth_refresh_tokens.c.revoked_at.is_(None)).values(used_at=ts))
        if not r.rowcount:
            return rec, True
        await tx.conn.execute(insert(auth_refresh_tokens).values(
            token_hash=new_hash, grant_id=rec.grant_id, client_id=rec.client_id, data=json.dumps(data),
            expires_at=expires_at, used_at=None, revoked_at=None))
        return rec, False


async def revoke_grant(store: Store, grant_id: str, expires_at: int) -> None:
    """Revoke a whole grant: its refresh-token family and every access token issued under it."""
    ts = now_us()
    async with store.begin() as tx:
        await tx.conn.execute(update(auth_refresh_tokens).where(auth_refresh_tokens.c.grant_id == grant_id,
                                                                auth_refresh_tokens.c.revoked_at.is_(None))
                              .values(revoked_at=ts))
        await tx.conn.execute(insert(auth_revocations).values(key=f"grant:{grant_id}", at=ts, created_at=ts,
                                                              expires_at=expires_at))


# ---------------------------------------------------------------------------------------------- revocations

async def add_revocation(store: Store, key: str, expires_at: int) -> int:
    ts = now_us()
    async with store.begin() as tx:
        await tx.conn.execute(insert(auth_revocations).values(key=key, at=ts, created_at=ts,
                                                              expires_at=expires_at))
    return ts


async def revocations_since(store: Store, created_after: int) -> list[tuple[str, int]]:
    """Live revocations recorded after ``created_after`` (microseconds)."""
    q = select(auth_revocations.c.key, auth_revocations.c.at).where(
        auth_revocations.c.created_at > created_after, auth_revocations.c.expires_at > now_us())
    async with store.read_conn() as conn:
        return [(r[0], int(r[1])) for r in (await conn.execute(q)).all()]


async def prune(store: Store) -> None:
    """Drop rows no token can depend on any more."""
    ts = now_us()
    async with store.begin() as tx:
        await tx.conn.execute(delete(auth_revocations).where(auth_revocations.c.expires_at < ts))
        await tx.conn.execute(delete(auth_refresh_tokens).where(auth_refresh_tokens.c.expires_at < ts))
        await tx.conn.execute(delete(auth_codes).where(auth_codes.c.expires_at < ts - 3_600_000_000))


# ---------------------------------------------------------------------------------------------- throttling

async def throttle_state(store: Store, keys: list[str]) -> dict[str, tuple[int, int, int]]:
    """key → (failures, window_start, locked_until)."""
    async with store.read_conn() as conn:
        rows = (await conn.execute(select(auth_throttle).where(auth_throttle.c.key.in_(keys)))).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


async def throttle_fail(store: Store, limits: dict[str, int], window_us: int, lock_us: int) -> None:
    """Count one failure for each key; a key reaching its limit inside the window is locked for ``lock_us``."""
    ts = now_us()
    async with store.begin() as tx:
        for key, limit in limits.items():
            row = (await tx.conn.execute(select(auth_throttle).where(auth_throttle.c.key == key))).first()
            if row is None or row[2] < ts - window_us:
                failures, start = 1, ts
            else:
                failures, start = int(row[1]) + 1, int(row[2])
            locked = ts + lock_us if failures >= limit else (int(row[3]) if row is not None else 0)
            if row is None:
                await tx.conn.execute(insert(auth_throttle).values(key=key, failures=failures, window_start=start,
                                                                   locked_until=locked))
            else:
                await tx.conn.execute(update(auth_throttle).where(auth_throttle.c.key == key).values(
                    failures=failures, window_start=start, locked_until=locked))


async def throttle_clear(store: Store, key: str) -> None:
    async with store.begin() as tx:
        await tx.conn.execute(delete(auth_throttle).where(auth_throttle.c.key == key))


# ---------------------------------------------------------------------------------------------- audit events

async def put_new_resources(tx: WriteTx, recs: list[tuple[StoredResource, str | None]]) -> None:
    """Insert brand-new resources (version 1, method POST, ids just made by :func:`dhp.store.new_id`) with their
    history rows: queued with the transaction's other writes (the SSO writes an AuditEvent per token)."""
    for r, patient in recs:
        await tx.put(r, "POST", exists_before=False, patient=patient, generated=True)
