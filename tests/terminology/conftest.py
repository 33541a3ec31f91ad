"""Terminology test fixtures: an engine over the session registry, and helpers to read the DHP packages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dhp.terminology import Terminology

CORE = "https://terminology.dhp.uz/fhir/core/"
CS = CORE + "CodeSystem/"
VS = CORE + "ValueSet/"
FJ = "application/fhir+json"
H = {"Content-Type": FJ, "Accept": FJ}
ADDRESS_USE = "http://hl7.org/fhir/address-use"


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


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    """A FHIR JSON client of the (parametrised) test server."""
    with httpx.Client(base_url=server.fhir, headers=H, timeout=60) as c:
        yield c
