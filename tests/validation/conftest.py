"""Fixtures for validation tests: validators over the session registry, with the real terminology engine."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from dhp import fhirjson

UZ = "https://dhp.uz/fhir/core/StructureDefinition/"
INT = "https://dhp.uz/fhir/integrations/StructureDefinition/"
BASE = "http://hl7.org/fhir/StructureDefinition/"
DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


@pytest.fixture(scope="session")
def terminology(registry: Any) -> Any:
    from dhp.terminology import Terminology

    return Terminology(registry)


@pytest.fixture(scope="session")
def validator(registry: Any, terminology: Any) -> Any:
    from dhp.validation import Validator

    return Validator(registry, terminology)


@pytest.fixture(scope="session")
def base_validator(registry: Any, terminology: Any) -> Any:
    """No default profiles: resources are checked against what they declare (or the base spec)."""
    from dhp.validation import Validator

    return Validator(registry, terminology, default_profiles={})


@pytest.fixture(scope="session")
def uz_core(registry: Any) -> Any:
    return next(p for p in registry.packages if p.id == "uz.dhp.core")


@pytest.fixture(scope="session")
def uz_examples(uz_core: Any) -> dict[str, tuple[bytes, dict[str, Any]]]:
    out = {}
    for e in uz_core.examples:
        raw = (Path(uz_core.root) / e["filename"]).read_bytes()
        out[Path(e["filename"]).name] = (raw, fhirjson.loads(raw))
    return out


@pytest.fixture
def david(uz_examples: dict[str, tuple[bytes, dict[str, Any]]]) -> dict[str, Any]:
    """A valid UZ Core Patient to break in tests (a fresh copy each time)."""
    return copy.deepcopy(uz_examples["Patient-example-david.json"][1])


def errors(issues: list[Any]) -> list[Any]:
    return [i for i in issues if i.severity in ("error", "fatal")]


def find(issues: list[Any], message_id: str, expression: str | None = None) -> list[Any]:
    return [i for i in issues if i.message_id == message_id and (expression is None or expression in i.expression)]
