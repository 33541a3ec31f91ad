"""Conformance: FHIR packages, the canonical registry and StructureDefinition access."""

from __future__ import annotations

from dhp.conformance.packages import Package, PackageError, PackageManager, PackageRef
from dhp.conformance.registry import CANONICAL_TYPES, Registry
from dhp.settings import Settings

__all__ = [
    "CANONICAL_TYPES", "Package", "PackageError", "PackageManager", "PackageRef", "Registry",
    "load_registry", "package_manager",
]


def package_manager(settings: Settings) -> PackageManager:
    return PackageManager(settings.package_cache, settings.package_paths, settings.registry_list)


def load_registry(settings: Settings) -> Registry:
    """Install (if needed) and index the configured packages and their dependencies."""
    pm = package_manager(settings)
    return Registry(pm.resolve(settings.package_list))
