"""Validation: structure against the base R5 definitions and profile conformance (UZ Core, Integrations).

``Validator(registry, terminology)`` validates parsed FHIR JSON and returns :class:`dhp.errors.Issue` lists;
``generate_snapshot`` builds snapshots for differential-only profiles.
"""

from dhp.validation.snapshot import generate_snapshot
from dhp.validation.validator import Validator

__all__ = ["Validator", "generate_snapshot"]
