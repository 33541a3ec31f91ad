"""The parsed form of a search: what ``dhp.search.parse`` produces and ``dhp.store.search`` turns into SQL.

Nodes of one list are ANDed; the values inside one node are ORed (a comma in the URL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: A token system that was not given (``code`` alone matches any system); ``|code`` gives None (no system).
ANY = "\x00any"


class RowCode(str):
    """A parameter code whose values are (also) other parameters' index rows (see ``dhp.search.shared``).

    It is the code everywhere a code is a name (messages, links, merging); SQL reads ``sources`` — (row code,
    target type or None) pairs — instead of rows under the code itself. ``by_type``: a search over several
    types, where each type lists its own sources and types not listed use the code's own rows.
    """

    sources: tuple[tuple[str, str | None], ...]
    by_type: dict[str, tuple[tuple[str, str | None], ...]] | None

    def __new__(cls, code: str, sources: tuple[tuple[str, str | None], ...] = (),
                by_type: dict[str, tuple[tuple[str, str | None], ...]] | None = None) -> RowCode:
        self = super().__new__(cls, code)
        self.sources = sources
        self.by_type = by_type
        return self


@dataclass(frozen=True)
class StringMatch:
    mode: str  # prefix | exact | contains
    text: str  # normalised (prefix/contains) or exact


@dataclass(frozen=True)
class TokenMatch:
    system: str | None  # ANY, None (explicitly no system) or a URI
    code: str | None  # None: any code in the system
    mode: str = "code"  # code | text | code-text | of-type | set
    codes: frozenset[tuple[str | None, str]] = frozenset()  # mode=set: (system, code) pairs
    type_system: str | None = None  # of-type
    type_code: str | None = None


@dataclass(frozen=True)
class RefMatch:
    target_type: str | None
    target_id: str | None
    url: str | None = None  # absolute or canonical URL
    version: str | None = None
    mode: str = "ref"  # ref | identifier | above | below
    ident_system: str | None = None
    ident_value: str | None = None


@dataclass(frozen=True)
class RangeMatch:
    """number, quantity and date values: ``[lo, hi]`` is the search value's implied range."""

    prefix: str
    lo: float
    hi: float
    value: float  # the exact value (ap, gt/lt on numbers)
    system: str | None = ANY  # quantity only
    code: str | None = None  # quantity only: unit code (or unit text when system is ANY)
    #: dates only: no indexed value of the parameter spans more than this (µs) — a bound that turns a
    #: half-open scan ("high >= x") into a range on the index's leading column
    width: int | None = None


@dataclass(frozen=True)
class UriMatch:
    mode: str  # eq | above | below
    value: str


@dataclass(frozen=True)
class NearMatch:
    lat: float
    lon: float
    km: float


@dataclass(frozen=True)
class CompositeMatch:
    parts: tuple[tuple[str, Any], ...]  # (component type, match) — at most 3


Match = StringMatch | TokenMatch | RefMatch | RangeMatch | UriMatch | NearMatch | CompositeMatch


@dataclass
class Clause:
    """One parameter occurrence on an index table."""

    table: str  # string | token | reference | date | number | quantity | uri | composite | near
    code: str
    matches: list[Match] = field(default_factory=list)
    negate: bool = False
    missing: bool | None = None  # :missing=true/false
    #: More OR-groups the SAME row must satisfy (merged conditions on a single-valued parameter).
    also: list[list[Match]] = field(default_factory=list)


@dataclass
class IdClause:
    ids: list[str]
    negate: bool = False
    missing: bool | None = None


@dataclass
class LastUpdated:
    matches: list[RangeMatch]


@dataclass
class Chain:
    """``code:Type.param=…``: resources whose reference ``code`` points at a match of ``sub`` in the target type."""

    code: str
    subs: dict[str, list[Node]]  # target type → conditions on it (ORed across types)


@dataclass
class Has:
    """``_has:Src:ref:…``: resources referenced (through ``ref_code``) by a ``src_type`` matching ``nodes``."""

    src_type: str
    ref_code: str
    nodes: list[Node]


@dataclass
class ListClause:
    list_ids: list[str]


@dataclass
class Compartment:
    comp_type: str
    comp_id: str
    codes: tuple[str, ...]  # reference parameters of the searched type that link it to the compartment
    self_type: bool = False  # the searched type is the compartment type itself


@dataclass
class TypeIs:
    """The resource is of one of these types (system-level searches)."""

    types: list[str]


@dataclass
class AnyOf:
    """OR across condition sets (authorisation filters)."""

    alternatives: list[list[Node]]


@dataclass
class Nothing:
    """Matches no resource (e.g. a type outside the caller's compartment)."""


Node = Clause | IdClause | LastUpdated | Chain | Has | ListClause | Compartment | AnyOf | Nothing | TypeIs


@dataclass(frozen=True)
class SortKey:
    table: str  # index table, or "_id" / "_lastUpdated"
    code: str
    desc: bool
    single: bool = False  # at most one index row per resource: joined, not aggregated


@dataclass(frozen=True)
class Include:
    source_type: str  # "*" for any
    code: str  # "*" for every reference parameter
    target_type: str | None
    iterate: bool
    reverse: bool


@dataclass
class SearchQuery:
    types: list[str]  # one for a type search; several (or all) for a system search
    nodes: list[Node] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 50
    total: str | None = None  # none | estimate | accurate
    summary: str | None = None
    elements: list[str] | None = None
    includes: list[Include] = field(default_factory=list)
    issues: list[Any] = field(default_factory=list)  # dhp.errors.Issue for ignored parameters
    echo: list[tuple[str, str]] = field(default_factory=list)  # the parameters used, for self/next links
