"""FHIR search: parameters from the registry, index extraction, URL parsing and query planning.

SQL lives in :mod:`dhp.store.search`; the interactions in :mod:`dhp.interactions.search`.
"""

from dhp.search.engine import ReindexJob, SearchEngine
from dhp.search.params import ParamDef, ParamRegistry
from dhp.search.parse import Parser

__all__ = ["ParamDef", "ParamRegistry", "Parser", "ReindexJob", "SearchEngine"]
