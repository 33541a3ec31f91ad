"""The canonical registry: ``url`` and ``url|version`` → conformance resource.

Package resources are indexed at start-up and read from disk on first use. Conformance resources
written through the API form an overlay that wins over package content; it is replaced as a whole
when the database says conformance changed (see ``store.conformance_epoch``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from dhp.conformance.packages import Package, _version_key

log = logging.getLogger("dhp.conformance")

CANONICAL_TYPES = frozenset({
    "StructureDefinition", "SearchParameter", "CodeSystem", "ValueSet", "ConceptMap", "NamingSystem",
    "OperationDefinition", "CapabilityStatement", "CompartmentDefinition", "ImplementationGuide",
    "StructureMap", "Questionnaire", "ActorDefinition", "Requirements", "TestScript", "GraphDefinition",
    "MessageDefinition", "ExampleScenario", "TerminologyCapabilities", "Library", "Measure", "PlanDefinition",
    "ActivityDefinition",
})

BASE = "http://hl7.org/fhir/StructureDefinition/"


class _Entry:
    __slots__ = ("meta", "package", "resource")

    def __init__(self, meta: dict[str, Any], package: Package | None, resource: dict[str, Any] | None) -> None:
        self.meta = meta
        self.package = package
        self.resource = resource


class Registry:
    """Resolves canonical URLs to conformance resources across packages and API-written resources."""

    def __init__(self, packages: Iterable[Package] = ()) -> None:
        self.packages: list[Package] = []
        self._by_url: dict[str, list[_Entry]] = {}
        self._by_type: dict[str, list[_Entry]] = {}
        self._overlay_by_url: dict[str, list[_Entry]] = {}
        self._overlay_by_type: dict[str, list[_Entry]] = {}
        self._lock = threading.Lock()
        self.epoch = 0
        #: Called after the overlay changes, so caches built on definitions can drop stale entries.
        self.listeners: list[Any] = []
        for p in packages:
            self.add_package(p)

    # -- building

    def add_package(self, pkg: Package) -> None:
        self.packages.append(pkg)
        for meta in pkg.entries:
            # Indexes written by older versions may hold entries without a usable resourceType.
            if not isinstance(meta.get("resourceType"), str):
                continue
            e = _Entry(meta, pkg, None)
            self._by_type.setdefault(meta["resourceType"], []).append(e)
            url = meta.get("url")
            if url:
                self._by_url.setdefault(url, []).append(e)

    def set_overlay(self, resources: Iterable[dict[str, Any]], epoch: int) -> None:
        by_url: dict[str, list[_Entry]] = {}
        by_type: dict[str, list[_Entry]] = {}
        for r in resources:
            meta = {k: r[k] for k in ("resourceType", "id", "url", "version", "name", "status", "kind",
                                       "type", "derivation", "baseDefinition", "supplements", "content")
                    if k in r and isinstance(r[k], str | bool)}
            e = _Entry(meta, None, r)
            by_type.setdefault(r["resourceType"], []).append(e)
            if r.get("url"):
                by_url.setdefault(r["url"], []).append(e)
        with self._lock:
            self._overlay_by_url, self._overlay_by_type, self.epoch = by_url, by_type, epoch
        for fn in self.listeners:
            try:
                fn()
            except Exception:
                # One consumer that cannot take the new definitions (a bug) must not fail the write that made
                # them (it is committed) nor every later request: the others still reload; it keeps its old state.
                log.exception("reloading after a conformance change failed in %r", fn)

    # -- reading

    def _load(self, e: _Entry) -> dict[str, Any]:
        if e.resource is None:
            assert e.package is not None
            e.resource = e.package.read(e.meta)
        return e.resource

    @staticmethod
    def _pick(entries: list[_Entry], version: str | None, rtype: str | None) -> _Entry | None:
        cands = [e for e in entries if rtype is None or e.meta.get("resourceType") == rtype]
        if version:
            exact = [e for e in cands if e.meta.get("version") == version]
            if exact:
                return exact[-1]
            # 'url|1.0' matches '1.0.x' (FHIR's partial version rule).
            partial = [e for e in cands if str(e.meta.get("version", "")).startswith(version + ".")]
            cands = partial
        if not cands:
            return None
        # Newest version; among equals, the last loaded (later packages override earlier ones).
        return max(enumerate(cands), key=lambda ie: (_version_key(str(ie[1].meta.get("version") or "0")),
                                                    ie[0]))[1]

    def resolve(self, canonical: str, resource_type: str | None = None) -> dict[str, Any] | None:
        """Resolve ``url`` or ``url|version``; returns the resource or None."""
        if not canonical:
            return None
        url, _, version = canonical.partition("|")
        url = url.split("#", 1)[0]
        mine = self._pick(self._overlay_by_url.get(url) or [], version or None, resource_type)
        # A version-less API copy is an override of the package one: no need to look there.
        packaged = (self._pick(self._by_url.get(url) or [], version or None, resource_type)
                    if mine is None or mine.meta.get("version") else None)
        if mine is not None and packaged is not None and packaged.meta.get("version") \
                and _version_key(str(packaged.meta["version"])) > _version_key(str(mine.meta["version"])):
            # Both versioned: the newest wins (SemVer), as for duplicates across packages; on a tie the
            # API-written copy wins.
            mine = None
        e = mine or packaged
        return self._load(e) if e is not None else None

    def iter_meta(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Index entries (not whole resources) of one type; overlay first."""
        for e in self._overlay_by_type.get(resource_type, ()):
            yield e.meta
        for e in self._by_type.get(resource_type, ()):
            yield e.meta

    def all(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """Every resource of one type, overlay first; a url|version present in the overlay hides the package copy."""
        seen: set[tuple[str, str]] = set()
        for e in self._overlay_by_type.get(resource_type, ()):
            seen.add((e.meta.get("url", ""), e.meta.get("version", "")))
            yield self._load(e)
        for e in self._by_type.get(resource_type, ()):
            key = (e.meta.get("url", ""), e.meta.get("version", ""))
            if key[0] and key in seen:
                continue
            yield self._load(e)

    def overlay(self, resource_type: str) -> list[dict[str, Any]]:
        """The API-written resources of one type (not package content)."""
        return [self._load(e) for e in self._overlay_by_type.get(resource_type, ())]

    def from_api(self, resource: dict[str, Any]) -> bool:
        """Was ``resource`` (as returned by :meth:`resolve`) written through the API, not read from a package?
        Package content is trusted as the operator installed it; API-written definitions are not."""
        url = resource.get("url")
        return any(e.resource is resource for e in self._overlay_by_url.get(url, ())) if isinstance(url, str) \
            else True

    def package_resources(self) -> Iterator[tuple[Package, dict[str, Any], dict[str, Any]]]:
        """(package, index entry, resource) for every resource of every package, in load order."""
        for p in self.packages:
            for meta in p.entries:
                yield p, meta, p.read(meta)

    # -- StructureDefinitions

    def structure_definition(self, name_or_url: str) -> dict[str, Any] | None:
        url = name_or_url if "/" in name_or_url else BASE + name_or_url
        return self.resolve(url, "StructureDefinition")

    def resource_types(self) -> frozenset[str]:
        """Concrete resource types of the loaded FHIR core."""
        cached = getattr(self, "_resource_types", None)
        if cached is not None:
            return cached
        out = set()
        for m in self.iter_meta("StructureDefinition"):
            if (m.get("kind") == "resource" and m.get("derivation") == "specialization"
                    and str(m.get("url", "")).startswith(BASE) and not m.get("abstract")):
                out.add(m.get("type") or m.get("id"))
        out.discard(None)
        self._resource_types = frozenset(out)  # type: ignore[arg-type]
        return self._resource_types  # type: ignore[return-value]

    def fhir_version(self) -> str:
        for p in self.packages:
            if p.id.startswith("hl7.fhir.r") and p.id.endswith(".core"):
                return p.version
        return "5.0.0"
