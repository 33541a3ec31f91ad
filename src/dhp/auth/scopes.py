"""SMART on FHIR scopes (v2 ``cruds`` and v1 ``read``/``write``/``*``) and the :class:`Principal` they grant.

A resource scope is ``<context>/<type>.<permissions>[?<query>]``: context ``patient``, ``user`` or ``system``;
type a resource type or ``*``; permissions a subset of ``cruds`` in that order (v2) or ``read``/``write``/``*``
(v1, mapped to ``rs``/``cud``/``cruds``); an optional query restricts which resources the scope covers
(``patient/Observation.rs?category=laboratory``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode

PERMS = "cruds"
CONTEXTS = ("patient", "user", "system")
V1_PERMS = {"read": "rs", "write": "cud", "*": "cruds"}

#: Scopes that are not about resources.
IDENTITY_SCOPES = frozenset({"openid", "profile", "fhirUser"})
LAUNCH_SCOPES = frozenset({"launch", "launch/patient", "launch/encounter"})
ACCESS_SCOPES = frozenset({"offline_access", "online_access"})
ADMIN_SCOPE = "dhp/admin"
OTHER_SCOPES = IDENTITY_SCOPES | LAUNCH_SCOPES | ACCESS_SCOPES | {ADMIN_SCOPE}

#: RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESOURCE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{1,63})\.([a-z*]+)(?:\?(.+))?$")


class ScopeError(ValueError):
    """A scope string that is not a valid SMART scope."""


@dataclass(frozen=True)
class ResourceScope:
    context: str  # patient | user | system
    type: str  # resource type or "*"
    perms: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()  # granular restriction, AND-ed
    text: str = ""
    raw_query: str = ""  # the query exactly as written (still percent-encoded)

    def covers_type(self, rtype: str) -> bool:
        return self.type == "*" or self.type == rtype

    def v2(self, perms: frozenset[str] | None = None) -> str:
        p = "".join(c for c in PERMS if c in (self.perms if perms is None else perms))
        s = f"{self.context}/{self.type}.{p}"
        if self.query:
            # The query as the client wrote it: re-joining the decoded pairs would turn %20 into a space, and a
            # space splits the token's scope claim into an extra, never granted scope.
            s += "?" + (self.raw_query or urlencode(self.query, quote_via=quote))
        return s


@functools.lru_cache(maxsize=4096)
def parse_resource_scope(s: str) -> ResourceScope | None:
    """The resource scope ``s`` names, None if it is not a resource scope; :class:`ScopeError` if malformed."""
    if "/" not in s or s in OTHER_SCOPES:
        return None
    m = _RESOURCE.match(s)
    if not m:
        raise ScopeError(f"malformed scope {s!r}")
    ctx, rtype, perms, query = m.groups()
    if perms in V1_PERMS:
        if query:
            raise ScopeError(f"a SMART v1 scope cannot carry a query: {s!r}")
        p = frozenset(V1_PERMS[perms])
    else:
        if not perms or any(c not in PERMS for c in perms) or "".join(c for c in PERMS if c in perms) != perms:
            raise ScopeError(f"permissions of {s!r} must be a subset of 'cruds' in that order")
        p = frozenset(perms)
    q: tuple[tuple[str, str], ...] = ()
    if query:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
        if not pairs or any(not k or not v or _CONTROL.search(k + v) for k, v in pairs):
            raise ScopeError(f"bad query in scope {s!r}")
        q = tuple(pairs)
    return ResourceScope(ctx, rtype, p, q, s, query or "")


def split_scope(scope: str | None) -> list[str]:
    return [s for s in (scope or "").split() if s]


def validate_scopes(scopes: list[str]) -> None:
    """Raise :class:`ScopeError` for any scope we do not know how to grant."""
    for s in scopes:
        if not _SCOPE_TOKEN.fullmatch(s):
            raise ScopeError(f"scope {s!r} has characters RFC 6749 does not allow in a scope")
        if s in OTHER_SCOPES:
            continue
        if parse_resource_scope(s) is None:
            raise ScopeError(f"unknown scope {s!r}")


def grant(requested: list[str], allowed: list[str], *, contexts: frozenset[str],
          extra: frozenset[str] = frozenset()) -> list[str]:
    """The part of ``requested`` that ``allowed`` permits, narrowing permissions where needed.

    ``contexts`` limits resource scopes to the contexts this grant may use (``system`` only for
    client_credentials, ``patient``/``user`` for a signed-in person); ``extra`` are non-resource scopes the
    grant type permits even when the client did not register them (openid, fhirUser, …).
    """
    allowed_res = [r for r in (parse_resource_scope(a) for a in allowed) if r is not None]
    allowed_other = {a for a in allowed if a in OTHER_SCOPES} | extra
    out: list[str] = []
    for s in requested:
        if s in OTHER_SCOPES:
            if s in allowed_other and s not in out:
                out.append(s)
            continue
        r = parse_resource_scope(s)
        if r is None or r.context not in contexts:
            continue
        perms: set[str] = set()
        for a in allowed_res:
            if a.context != r.context or not (a.type == "*" or a.type == r.type):
                continue
            # A granular allowed scope only covers requests at least as narrow as it.
            if a.query and not set(a.query) <= set(r.query):
                continue
            perms |= a.perms & r.perms
        if not perms:
            continue
        text = r.text if perms == r.perms else r.v2(frozenset(perms))
        if text not in out:
            out.append(text)
    return out


@dataclass
class Principal:
    """Who calls the FHIR API, and what their token's scopes let them do."""

    client_id: str
    sub: str
    scopes: list[str]
    fhir_user: str | None = None
    patient: str | None = None  # the launch-context patient id that patient/ scopes are bound to
    jti: str | None = None
    grant_id: str | None = None
    expires_at: int = 0  # seconds since the epoch
    issued_at: int = 0
    resource_scopes: list[ResourceScope] = field(default_factory=list)
    _can: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.resource_scopes:
            rs = []
            for s in self.scopes:
                try:
                    r = parse_resource_scope(s)
                except ScopeError:
                    continue
                # patient/ scopes mean nothing without a patient to bind them to.
                if r is not None and (r.context != "patient" or self.patient):
                    rs.append(r)
            self.resource_scopes = rs

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def scopes_for(self, interaction: str, resource_type: str) -> list[ResourceScope]:
        return [r for r in self.resource_scopes if interaction in r.perms and r.covers_type(resource_type)]

    def can(self, interaction: str, resource_type: str) -> bool:
        """May this token perform ``interaction`` (one of c, r, u, d, s) on ``resource_type`` at all?"""
        key = (interaction, resource_type)
        v = self._can.get(key)
        if v is None:
            v = self._can[key] = bool(self.scopes_for(interaction, resource_type))
        return v

    def query_filters(self, interaction: str, resource_type: str) -> list[list[tuple[str, str]]] | None:
        """Search restrictions from granular scopes: None = unrestricted, else alternative filter sets
        (a resource must match every pair of at least one set). An empty list: nothing is allowed."""
        alts: list[list[tuple[str, str]]] = []
        for r in self.scopes_for(interaction, resource_type):
            if not r.query:
                return None
            alts.append(list(r.query))
        return alts

    def compartment(self, interaction: str, resource_type: str) -> str | None:
        """The patient id searches/reads must be limited to: set when only patient/ scopes permit this."""
        rs = self.scopes_for(interaction, resource_type)
        if not rs or any(r.context != "patient" for r in rs):
            return None
        return self.patient

    def to_dict(self) -> dict[str, object]:
        return {"client_id": self.client_id, "sub": self.sub, "scope": " ".join(self.scopes),
                "fhirUser": self.fhir_user, "patient": self.patient}
