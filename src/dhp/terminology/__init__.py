"""Terminology: CodeSystem / ValueSet / ConceptMap / NamingSystem engine (lookup, validate-code, subsumes,
expand, translate), in Uzbek, Russian and English."""

from __future__ import annotations

from dhp.terminology.engine import Terminology, Verdict
from dhp.terminology.types import CodeCheck, CodeValidator
from dhp.terminology.valueset import Options, RenderOptions

__all__ = ["CodeCheck", "CodeValidator", "Options", "RenderOptions", "Terminology", "Verdict"]
