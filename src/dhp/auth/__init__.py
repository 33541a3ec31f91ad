"""DHP's own SSO: OAuth 2.0 / OpenID Connect with SMART App Launch v2 scopes guarding the FHIR API.

The lead's API wires it in: :func:`routes` (mounted at the app root), :func:`start` once per process after
the store is open, :func:`authenticate` per FHIR request (unless ``DHP_AUTH=off``), ``Principal.can`` before
every interaction and :func:`check_resource` for single resources. See docs/auth.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dhp.auth.compartment import Compartments, check_resource
from dhp.auth.core import AuthError, AuthState, create_client, create_user
from dhp.auth.endpoints import routes
from dhp.auth.scopes import Principal, ScopeError, parse_resource_scope

__all__ = [
    "ADMIN_CLIENT_ID", "HOT_PATHS", "AuthError", "AuthState", "Principal", "ScopeError", "authenticate", "check_resource",
    "create_client", "create_user", "ensure_admin_client", "parse_resource_scope", "routes", "start", "stop",
]

ADMIN_CLIENT_ID = "dhp-admin"
#: Endpoints the API front door calls directly, past route matching: token issue is the SSO's hot path.
HOT_PATHS = ("/oauth/token",)
ADMIN_SCOPES = "system/*.cruds dhp/admin"


async def start(server: Any) -> None:
    """Load (or on an empty database create) the signing keys and the revocation set; idempotent."""
    from dhp.auth.audit import AuditWriter
    from dhp.store import auth as db

    if isinstance(server.auth, AuthState):
        return
    state = AuthState(server)
    await state.load_keys()
    await db.prune(server.store)
    await state.sync_revocations(force=True)
    state.audit = AuditWriter(server.store, server)
    state.compartments = Compartments(server.registry)
    server.auth = state


async def stop(server: Any) -> None:
    """Wait for queued audit events and stop the signer process (call at shutdown)."""
    if isinstance(server.auth, AuthState):
        if server.auth.audit is not None:
            await server.auth.audit.close()
        await server.auth.close()


async def ensure_admin_client(server: Any) -> dict[str, Any] | None:
    """On an empty database create the admin client (``system/*.cruds dhp/admin``) and return its
    credentials once; None when an admin client exists already."""
    from sqlalchemy.exc import IntegrityError

    from dhp.store import auth as db

    if await db.count_clients(server.store, admin_only=True):
        return None
    try:
        return await create_client(server.store, name="DHP administrator", scopes=ADMIN_SCOPES,
                                   grant_types=["client_credentials"], admin=True, client_id=ADMIN_CLIENT_ID)
    except IntegrityError:  # another process created it first
        return None


async def authenticate(server: Any, headers: Mapping[str, str]) -> Principal:
    """Verify ``Authorization: Bearer`` and return the caller; :class:`AuthError` (401) otherwise."""
    state: AuthState = server.auth
    return await state.authenticate(headers)
