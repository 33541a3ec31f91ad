"""Terminology test fixtures: an engine over the session registry, and helpers to read the DHP packages."""

from __future__ import annotations

from typing import Any

import pytest

from dhp.terminology import Terminology

CORE = "https://terminology.dhp.uz/fhir/core/"
CS = CORE + "CodeSystem/"
VS = CORE + "ValueSet/"


@pytest.fixture(scope="module")
def term(registry: Any) -> Terminology:
    return Terminology(registry, max_expansion=10_000)


@pytest.fixture(scope="session")
def package_cs(registry: Any) -> Any:
    """The raw CodeSystem JSON from the packages (expected values are computed from it, not hard-coded)."""

    def get(url: str) -> dict[str, Any]:
        res = registry.resolve(url, "CodeSystem")
        assert res is not None, url
        return res

    return get
