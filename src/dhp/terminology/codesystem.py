"""In-memory index of one CodeSystem: code → concept, designations by language, hierarchy, properties.

Built once per CodeSystem ``url|version`` on first use, with every supplement of that system merged in
(supplements add designations and properties; SPEC §6).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

CONCEPT_PROPERTIES = "http://hl7.org/fhir/concept-properties#"
# Properties a filter may name in any code system: FHIR's concept properties and what the index derives.
BUILTIN_PROPERTIES = frozenset({
    "concept", "code", "display", "definition", "designation", "parent", "child", "partOf", "inactive", "status",
    "notSelectable", "abstract", "deprecated", "deprecationDate", "retirementDate", "effectiveDate", "synonym",
    "comment", "itemWeight", "order"})

# Code systems whose hierarchy is carried in the code itself rather than in nested concepts or
# parent/child properties. KODP-2020 (position-and-profession-cs): "1111" is a group of positions,
# "1111.1", "1111.2", … are the positions in that group.
DOTTED_HIERARCHY = frozenset({
    "https://terminology.dhp.uz/fhir/core/CodeSystem/position-and-profession-cs",
})


def property_value(p: dict[str, Any]) -> Any:
    for k, v in p.items():
        if k.startswith("value"):
            return v
    return None


def value_text(v: Any) -> str:
    """A property value as the string filters compare against."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):  # Coding
        return str(v.get("code", ""))
    return "" if v is None else str(v)


class Concept:
    __slots__ = (
        "abstract",
        "by_lang",
        "children",
        "code",
        "definition",
        "designations",
        "display",
        "inactive",
        "parents",
        "properties",
        "status",
    )

    def __init__(self, code: str, display: str | None, definition: str | None) -> None:
        self.code = code
        self.display = display
        self.definition = definition
        # Sequences start as the shared empty tuple or as the resource's own lists, and are replaced (never
        # changed in place) when something is added: 12,551 concepts × 4 lists is a lot of allocation.
        self.designations: Sequence[dict[str, Any]] = ()  # {language?, use?, value}
        self.properties: Sequence[dict[str, Any]] = ()  # {code, value[x]}
        self.parents: Sequence[str] = ()
        self.children: Sequence[str] = ()
        self.abstract = False
        self.inactive = False
        self.status: str | None = None
        self.by_lang: dict[str, str] = {}

    def display_for(self, langs: Iterable[str]) -> str | None:
        for lang in langs:
            v = self.by_lang.get(lang)
            if v is not None:
                return v
        if self.display is not None:
            return self.display
        return self.designations[0]["value"] if self.designations else None

    def all_texts(self) -> Iterator[str]:
        if self.display:
            yield self.display
        for d in self.designations:
            v = d.get("value")
            if isinstance(v, str):
                yield v

    def property_values(self, code: str) -> list[Any]:
        return [property_value(p) for p in self.properties if p.get("code") == code]


class CodeSystemIndex:
    """One CodeSystem, ready for lookups, filters and subsumption."""

    def __init__(self, resource: dict[str, Any], supplements: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        self.url: str = resource.get("url") or ""
        self.version: str | None = resource.get("version")
        self.name: str = resource.get("title") or resource.get("name") or self.url
        self.content: str = resource.get("content", "complete")
        self.case_sensitive: bool = resource.get("caseSensitive", True) is not False
        self.hierarchy_meaning: str | None = resource.get("hierarchyMeaning")
        # HL7 code systems without a language are written in English.
        self.language: str = str(resource.get("language") or "en").lower()
        self.resource_meta = {k: v for k, v in resource.items() if k not in ("concept", "text")}
        self.property_defs: dict[str, dict[str, Any]] = {
            p["code"]: p for p in (resource.get("property") or []) if isinstance(p, dict) and "code" in p}
        self.concepts: dict[str, Concept] = {}
        self.order: list[Concept] = []
        self.supplements: list[str] = []
        self._lower: dict[str, Concept] | None = None
        self._desc: dict[str, frozenset[str]] = {}
        self._anc: dict[str, frozenset[str]] = {}
        self._has_properties = False
        self._used_props: frozenset[Any] | None = None
        self._all_items: Any = None  # every code as expansion items (dhp.terminology.valueset.all_items)

        parent_codes = {c for c, p in self.property_defs.items() if p.get("uri") == CONCEPT_PROPERTIES + "parent"}
        parent_codes.add("parent")
        child_codes = {c for c, p in self.property_defs.items() if p.get("uri") == CONCEPT_PROPERTIES + "child"}
        child_codes.add("child")
        self._parent_props = frozenset(parent_codes)
        self._child_props = frozenset(child_codes)
        self._status_props = frozenset(
            {"status"} | {c for c, p in self.property_defs.items() if p.get("uri") == CONCEPT_PROPERTIES + "status"})
        self._inactive_props = frozenset(
            {"inactive"} | {c for c, p in self.property_defs.items()
                            if p.get("uri") == CONCEPT_PROPERTIES + "inactive"})
        self._abstract_props = frozenset(
            {"notSelectable", "abstract"} | {c for c, p in self.property_defs.items()
                                             if p.get("uri") == CONCEPT_PROPERTIES + "notSelectable"})

        self._walk(resource.get("concept") or [], None)
        for sup in supplements:
            self._merge_supplement(sup)
        self._link()

    # -- building

    def _walk(self, concepts: list[dict[str, Any]], parent: str | None) -> None:
        # The hot loop of index building (12,551 concepts for KODP): kept flat on purpose.
        index, order, lang0 = self.concepts, self.order, self.language
        for c in concepts:
            code = c.get("code")
            if code.__class__ is not str:
                continue
            con = index.get(code)
            if con is None:
                con = Concept(code, c.get("display"), c.get("definition"))
                index[code] = con
                order.append(con)
                by_lang = con.by_lang
                if con.display is not None:
                    by_lang[lang0] = con.display
                desig = c.get("designation")
                if desig:
                    good = [d for d in desig if d.__class__ is dict and d.get("value").__class__ is str]
                    con.designations = desig if len(good) == len(desig) else good
                    for d in con.designations:
                        lang = d.get("language")
                        if lang.__class__ is str:
                            if not lang.islower():
                                lang = lang.lower()
                            if lang not in by_lang:
                                by_lang[lang] = d["value"]
                            if "-" in lang:
                                by_lang.setdefault(lang.split("-", 1)[0], d["value"])
                props = c.get("property")
                if props:
                    con.properties = [p for p in props if p.__class__ is dict]
                    self._has_properties = True
            if parent is not None and parent not in con.parents:
                con.parents = [*con.parents, parent]
            sub = c.get("concept")
            if sub:
                self._walk(sub, code)

    @staticmethod
    def _add_designation(con: Concept, d: dict[str, Any]) -> None:
        if not isinstance(d, dict) or not isinstance(d.get("value"), str):
            return
        con.designations = [*con.designations, d]
        lang = d.get("language")
        if isinstance(lang, str):
            lang = lang.lower()
            con.by_lang.setdefault(lang, d["value"])
            con.by_lang.setdefault(lang.split("-", 1)[0], d["value"])

    def _merge_supplement(self, sup: dict[str, Any]) -> None:
        self.supplements.append(sup.get("url", "") + ("|" + sup["version"] if sup.get("version") else ""))
        lang = sup.get("language")
        for code, c in _flatten(sup.get("concept") or []):
            con = self.concepts.get(code)
            if con is None:
                if self.content != "not-present":
                    continue
                # A system not loaded here: the supplement's codes are all we know (displays only).
                con = Concept(code, None, None)
                self.concepts[code] = con
                self.order.append(con)
            if c.get("display") and lang:
                self._add_designation(con, {"language": lang, "value": c["display"]})
            for d in c.get("designation") or []:
                self._add_designation(con, d)
            extra = [p for p in c.get("property") or [] if isinstance(p, dict)]
            if extra:
                con.properties = [*con.properties, *extra]
                self._has_properties = True
        for p in sup.get("property") or []:
            if isinstance(p, dict) and "code" in p:
                self.property_defs.setdefault(p["code"], p)

    def _link(self) -> None:
        concepts = self.concepts
        for con in self.order if self._has_properties else ():
            for p in con.properties:
                pc = p.get("code")
                v = property_value(p)
                if pc in self._parent_props:
                    target = value_text(v)
                    if target and target != con.code and target not in con.parents:
                        con.parents = [*con.parents, target]
                elif pc in self._child_props:
                    target = value_text(v)
                    child = concepts.get(target)
                    if child is not None and con.code not in child.parents and target != con.code:
                        child.parents = [*child.parents, con.code]
                elif pc in self._status_props:
                    con.status = value_text(v)
                    if con.status in ("retired", "inactive"):
                        con.inactive = True
                elif pc in self._inactive_props and v is True:
                    con.inactive = True
                elif pc in self._abstract_props and v is True:
                    con.abstract = True
        if self.url in DOTTED_HIERARCHY:
            for con in self.order:
                head, dot, _ = con.code.rpartition(".")
                if dot and head in concepts and head not in con.parents:
                    con.parents = [*con.parents, head]
        kids: dict[str, list[str]] = {}
        for con in self.order:
            if not con.parents:
                continue
            if not all(p in concepts for p in con.parents):
                con.parents = [p for p in con.parents if p in concepts]
            for p in con.parents:
                lst = kids.get(p)
                if lst is None:
                    kids[p] = [con.code]
                else:
                    lst.append(con.code)
        for code, lst in kids.items():
            concepts[code].children = lst

    # -- reading

    def knows_property(self, code: str) -> bool:
        """Whether a filter on property ``code`` means anything here (defined, built in, or used by a concept)."""
        if code in BUILTIN_PROPERTIES or code in self.property_defs or code in self._parent_props \
                or code in self._child_props:
            return True
        if self._used_props is None:
            self._used_props = frozenset(p.get("code") for c in self.order for p in c.properties)
        return code in self._used_props

    @property
    def canonical(self) -> str:
        return self.url + ("|" + self.version if self.version else "")

    @property
    def complete(self) -> bool:
        return self.content == "complete"

    def get(self, code: str) -> Concept | None:
        con = self.concepts.get(code)
        if con is None and not self.case_sensitive:
            if self._lower is None:
                self._lower = {c.code.lower(): c for c in self.order}
            con = self._lower.get(code.lower())
        return con

    def descendants(self, code: str) -> frozenset[str]:
        """Every code below ``code`` (not including it)."""
        got = self._desc.get(code)
        if got is not None:
            return got
        out: set[str] = set()
        stack = list(self.concepts[code].children) if code in self.concepts else []
        while stack:
            c = stack.pop()
            if c in out:
                continue
            out.add(c)
            stack.extend(self.concepts[c].children)
        res = frozenset(out)
        self._desc[code] = res
        return res

    def ancestors(self, code: str) -> frozenset[str]:
        """Every code above ``code`` (not including it)."""
        got = self._anc.get(code)
        if got is not None:
            return got
        out: set[str] = set()
        stack = list(self.concepts[code].parents) if code in self.concepts else []
        while stack:
            c = stack.pop()
            if c in out:
                continue
            out.add(c)
            stack.extend(self.concepts[c].parents)
        res = frozenset(out)
        self._anc[code] = res
        return res

    def subsumes(self, a: str, b: str) -> str:
        """Subsumption outcome of A relative to B: equivalent | subsumes | subsumed-by | not-subsumed."""
        if a == b:
            return "equivalent"
        if b in self.descendants(a):
            return "subsumes"
        if a in self.descendants(b):
            return "subsumed-by"
        return "not-subsumed"


def _flatten(concepts: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for c in concepts:
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            yield c["code"], c
            yield from _flatten(c.get("concept") or [])
