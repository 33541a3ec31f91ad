"""The search parameters the server knows: R5 core, loaded IG packages and API-created SearchParameters.

Built from the conformance registry; API-created ones (the overlay) come first and win over package
definitions with the same base and code. Compartments come from CompartmentDefinition resources.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dhp.conformance import Registry

log = logging.getLogger("dhp.search")

#: Types that are Resources but not DomainResources (no text/contained/extension).
NON_DOMAIN = frozenset({"Bundle", "Binary", "Parameters"})

#: Result and control parameters handled by the query planner itself (never matched against the index).
RESULT_PARAMS = frozenset({
    "_sort", "_count", "_include", "_revinclude", "_summary", "_total", "_elements", "_contained",
    "_containedType", "_format", "_pretty", "_cursor", "_maxresults", "_graph", "_score",
})

#: Parameters that need no index rows: answered from the resources table or by the planner.
PLANNER_PARAMS = frozenset({"_id", "_lastUpdated", "_has", "_type", "_list", "_in"})

#: Special parameters this server cannot evaluate; asking for them is reported, never silently ignored.
UNSUPPORTED = frozenset({"_text", "_content", "_filter", "_query"})

#: Special parameters the query planner answers itself.
PLANNED_SPECIALS = frozenset({"_has", "_list"})


@dataclass(frozen=True)
class Component:
    definition: str  # canonical URL of the component's SearchParameter
    expression: str
    type: str  # the component parameter's type


@dataclass
class ParamDef:
    code: str
    type: str  # number | date | string | token | reference | composite | quantity | uri | special
    url: str
    base: tuple[str, ...]
    expression: str
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    modifiers: tuple[str, ...] = ()
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Why its values cannot be indexed as its type says, if they cannot (see ``ParamRegistry._classify``).
    unevaluable: str = ""
    #: A number parameter over one date element (``Patient.birthDate`` for the extensions package's ``age``):
    #: whole years from that date to today, searched through the date parameter indexing the element.
    years_since: str = ""

    @property
    def indexed(self) -> bool:
        return self.code not in PLANNER_PARAMS and self.code not in UNSUPPORTED and (
            self.type != "special" or self.code == "near") and bool(self.expression) and not self.unevaluable \
            and not self.years_since

    @property
    def searchable(self) -> bool:
        """Whether a search on its own type can use it — what the CapabilityStatement lists. (``_type`` belongs
        to system searches; ``_in`` and the unsupported ones are reported by the parser.)"""
        if self.code in PLANNED_SPECIALS:
            return True
        return not (self.unevaluable or self.code in UNSUPPORTED or self.code in ("_in", "_type")
                    or (self.type == "special" and self.code != "near"))


_DATE_TYPES = frozenset({"date", "dateTime", "instant"})

_OFTYPE_KIND = {"string": "string", "markdown": "string", "Quantity": "quantity", "CodeableConcept": "token",
                "Coding": "token", "code": "token", "boolean": "token", "dateTime": "date", "Period": "date",
                "date": "date", "Reference": "reference", "integer": "number", "decimal": "number"}


def _infer_type(expression: str) -> str:
    """A component's type when its definition is missing (R5 names Observation-value-string but lacks it)."""
    for name, kind in _OFTYPE_KIND.items():
        if f"ofType({name})" in expression:
            return kind
    return ""


def _strings(v: Any) -> tuple[str, ...]:
    """A list of strings as a tuple; anything else (a bare string would be its characters) as none."""
    return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()


class ParamRegistry:
    """Search parameters by (resource type, code), compartments by compartment type."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._by_base: dict[str, dict[str, ParamDef]] = {}
        self._by_url: dict[str, ParamDef] = {}
        self._for_type: dict[str, dict[str, ParamDef]] = {}
        self.compartments: dict[str, dict[str, tuple[str, ...]]] = {}
        self.resource_types = registry.resource_types()
        self._load()

    def _load(self) -> None:
        defs = list(self.registry.all("SearchParameter"))
        urls = {}
        for sp in defs:
            url = sp.get("url")
            if isinstance(url, str) and url not in urls:
                urls[url] = sp
        for sp in defs:
            p = self._make(sp, urls)
            if p is None:
                continue
            if p.url and p.url not in self._by_url:
                self._by_url[p.url] = p
            p.unevaluable, p.years_since = self._classify(p)
            for b in p.base:
                # First definition wins: overlay (API-written) comes before packages.
                self._by_base.setdefault(b, {}).setdefault(p.code, p)
        for cd in self.registry.all("CompartmentDefinition"):
            if cd.get("status") == "retired" or not isinstance(cd.get("code"), str):
                continue
            comp = self.compartments.setdefault(cd["code"], {})
            for r in cd.get("resource") or []:
                codes = tuple(p for p in r.get("param") or [] if isinstance(p, str))
                if codes and isinstance(r.get("code"), str):
                    comp.setdefault(r["code"], codes)

    def _classify(self, p: ParamDef) -> tuple[str, str]:
        """(why ``p``'s values cannot be indexed as its type, or ""; the date element it counts years from, or
        ""). A number parameter over date elements indexes nothing: the extensions package's Patient ``age`` is
        ``Patient.birthDate``, an age in years as of today. Over one element it is searched as such; over
        several it is reported as unsupported (never answered empty)."""
        if p.type != "number" or not p.expression:
            return "", ""
        kinds: set[str] = set()
        paths = []
        for part in p.expression.split("|"):
            rtype, _, elem = part.strip().partition(".")
            if not elem or not elem.isidentifier():
                return "", ""  # not a plain path on the resource: leave it to extraction
            sd = self.registry.structure_definition(rtype)
            el = next((e for e in ((sd or {}).get("snapshot") or {}).get("element") or []
                       if e.get("path") == f"{rtype}.{elem}"), None)
            if el is None:
                return "", ""
            kinds.update(t.get("code") for t in el.get("type") or [] if isinstance(t, dict))
            paths.append(f"{rtype}.{elem}")
        if not kinds or not kinds <= _DATE_TYPES:
            return "", ""
        if len(paths) == 1:
            return "", paths[0]
        return f"a number parameter over {'/'.join(sorted(kinds))} elements ({p.expression})", ""

    def date_param_of(self, rtype: str, path: str) -> ParamDef | None:
        """The date parameter of ``rtype`` whose expression reads ``path`` (one of its ``|`` parts)."""
        for q in self.for_type(rtype).values():
            if q.type == "date" and path in (x.strip() for x in q.expression.split("|")):
                return q
        return None

    @staticmethod
    def _make(sp: dict[str, Any], urls: dict[str, dict[str, Any]]) -> ParamDef | None:
        code, ptype = sp.get("code"), sp.get("type")
        base = sp.get("base")
        if not isinstance(code, str) or not isinstance(ptype, str) or not isinstance(base, list):
            return None
        if sp.get("status") == "retired":
            return None
        url = sp.get("url")
        url = url if isinstance(url, str) else ""
        if url.startswith("http://hl7.org/fhir/SearchParameter/example"):
            return None  # the spec's worked examples (e.g. "part-agree"), not parameters of the base spec
        # Definitions are loaded on every request that searches or writes: one with wrong JSON types (stored
        # before create-time checks existed, or through a path without them) is skipped, never a 500 for all.
        expr = sp.get("expression")
        if expr is not None and not isinstance(expr, str):
            log.warning("SearchParameter %s (%s) skipped: expression is not a string", url, code)
            return None
        comps = []
        for c in sp.get("component") or []:
            if not isinstance(c, dict) or not isinstance(c.get("definition", ""), str) \
                    or not isinstance(c.get("expression", ""), str):
                log.warning("SearchParameter %s (%s) skipped: a component is malformed", url, code)
                return None
            d = urls.get(c.get("definition", "").split("|")[0])
            ctype = d.get("type", "") if d else _infer_type(c.get("expression", ""))
            comps.append(Component(c.get("definition", ""), c.get("expression", ""),
                                   ctype if isinstance(ctype, str) else ""))
        name = sp.get("name")
        return ParamDef(
            code=code, type=ptype, url=url, base=tuple(b for b in base if isinstance(b, str)),
            expression=expr or "", targets=_strings(sp.get("target")), components=tuple(comps),
            modifiers=_strings(sp.get("modifier")), name=name if isinstance(name, str) else "")

    def for_type(self, rtype: str) -> dict[str, ParamDef]:
        """Every parameter applicable to a resource type, by code (own definitions win over Resource's)."""
        got = self._for_type.get(rtype)
        if got is None:
            got = {}
            got.update(self._by_base.get("Resource", {}))
            if rtype not in NON_DOMAIN:
                got.update(self._by_base.get("DomainResource", {}))
            got.update(self._by_base.get(rtype, {}))
            self._for_type[rtype] = got
        return got

    def get(self, rtype: str, code: str) -> ParamDef | None:
        return self.for_type(rtype).get(code)

    def by_url(self, url: str) -> ParamDef | None:
        return self._by_url.get(url.split("|")[0])

    def indexed(self, rtype: str) -> list[ParamDef]:
        return [p for p in self.for_type(rtype).values() if p.indexed]

    def compartment_params(self, comp_type: str, rtype: str) -> tuple[str, ...] | None:
        """Parameter codes linking ``rtype`` into a ``comp_type`` compartment; None if not a member type."""
        comp = self.compartments.get(comp_type)
        if comp is None:
            return None
        return comp.get(rtype)
