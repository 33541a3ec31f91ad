"""What an interaction runs with: the process-wide :class:`Server` services and the per-request context."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dhp.conformance import CANONICAL_TYPES, Registry
from dhp.settings import Settings
from dhp.store import Store

log = logging.getLogger("dhp")


class Principal(Protocol):
    """Who is calling (set by ``dhp.auth``); interactions ask it before acting."""

    def can(self, interaction: str, resource_type: str) -> bool: ...


@dataclass
class RequestContext:
    base_url: str  # the FHIR base, e.g. https://host/fhir
    principal: Any = None  # dhp.auth Principal, or None when auth is off
    prefer: dict[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    accept_language: str | None = None

    @property
    def strict(self) -> bool:
        return self.prefer.get("handling") == "strict"


class Server:
    """Process-wide services. Everything persistent lives in the store; this object only caches."""

    def __init__(self, settings: Settings, registry: Registry, store: Store) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.terminology: Any = None  # dhp.terminology.Terminology
        self.validator: Any = None  # dhp.validation.Validator
        self.search: Any = None  # dhp.search engine
        self.auth: Any = None  # dhp.auth state (keys, …)
        self.documents: Any = None  # dhp.documents service (document Bundles)
        #: dhp.auth.check_resource, wired when auth is on: (server, principal, interaction, resource) -> None
        self.check_resource: Any = None
        self._epoch_seen = -1
        self._epoch_checked = 0.0

    async def maybe_sync_conformance(self, max_age: float | None = None) -> None:
        """Notice conformance changes made by other processes, checking the database at most every ``max_age``
        seconds (default: ``DHP_CONFORMANCE_POLL``)."""
        if max_age is None:
            max_age = self.settings.conformance_poll
        now = time.monotonic()
        if now - self._epoch_checked < max_age:
            return
        self._epoch_checked = now
        await self.sync_conformance()

    async def sync_conformance(self) -> None:
        """Reload API-written conformance resources if any process changed them since we last looked, and read
        the open search reindex jobs (searches on their parameters warn; a stopped one is taken over)."""
        epoch = await self.store.conformance_epoch()
        if epoch != self._epoch_seen:
            from dhp import fhirjson

            overlay = [fhirjson.fast_loads(c) for c in await self.store.api_resources_of_types(CANONICAL_TYPES)]
            self.registry.set_overlay(overlay, epoch)
            self._epoch_seen = epoch
        if self.search is not None:
            await self.search.sync_jobs(self.store)
