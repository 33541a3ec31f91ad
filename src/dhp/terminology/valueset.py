"""ValueSet expansion: compose (include/exclude, concept lists, filters, nested value sets) → ordered codes.

An :class:`Expansion` is the full, unpaged result for one ValueSet and one set of options; it is cached by the
engine and shared by ``$expand`` (which pages, filters text and renders displays per request), ``$validate-code``,
search (``:in``/``:not-in``) and profile validation (bindings).
"""

from __future__ import annotations

import re
import time
import uuid
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dhp.errors import FHIRError
from dhp.regexguard import MAX_UNBOUNDED as _REGEX_MAX_UNBOUNDED
from dhp.regexguard import parsed_risk as _regex_risk
from dhp.terminology.codesystem import CodeSystemIndex, Concept, value_text
from dhp.terminology.text import no_gc, words, words_many

try:  # the regular-expression parser, to vet client regexes before running them
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre  # type: ignore[no-redef]

if TYPE_CHECKING:
    from dhp.terminology.engine import Terminology


FILTER_OPS = frozenset({"=", "is-a", "descendent-of", "is-not-a", "regex", "in", "not-in", "generalizes",
                        "child-of", "descendent-leaf", "exists"})


class Item:
    """One code of an expansion."""

    __slots__ = ("abstract", "code", "concept", "designations", "display", "inactive", "system", "version")

    def __init__(self, system: str, version: str | None, code: str, concept: Concept | None,
                 display: str | None = None, designations: Sequence[dict[str, Any]] | None = None) -> None:
        self.system = system
        self.version = version
        self.code = code
        self.concept = concept
        self.display = display  # the value set's own display, when it gives one
        self.designations = designations or ()  # the value set's own designations
        self.abstract = concept.abstract if concept is not None else False
        self.inactive = concept.inactive if concept is not None else False

    def display_for(self, langs: Iterable[str]) -> str | None:
        langs = tuple(langs)
        if self.designations:
            for lang in langs:
                for d in self.designations:
                    dl = str(d.get("language", "")).lower()
                    if dl == lang or dl.split("-", 1)[0] == lang:
                        return d["value"]
        if self.concept is not None:
            if self.display is not None:
                for lang in langs:
                    v = self.concept.by_lang.get(lang)
                    if v is not None:
                        return v
                return self.display
            return self.concept.display_for(langs)
        return self.display

    def texts(self) -> Iterable[str]:
        yield self.code
        if self.display:
            yield self.display
        for d in self.designations:
            yield d.get("value", "")
        if self.concept is not None:
            yield from self.concept.all_texts()

    def all_designations(self) -> list[dict[str, Any]]:
        out = list(self.designations)
        if self.concept is not None:
            out.extend(self.concept.designations)
        return out


class SystemItems(list):  # type: ignore[type-arg]
    """Every code of one code system as expansion items, in order, with a (system, code) index; built once per
    CodeSystem index and shared (read-only) by all expansions that include the whole system."""

    index: dict[tuple[str, str], Item]
    vocab: tuple[dict[str, list[int]], list[str]] | None = None  # type-ahead word index, shared


def all_items(cs: CodeSystemIndex) -> SystemItems:
    got = cs._all_items
    if got is None:
        with no_gc():
            got = SystemItems(Item(cs.url, cs.version, c.code, c) for c in cs.order)
            got.index = {(it.system, it.code): it for it in got}
            got.vocab = None
        cs._all_items = got
    return got


@dataclass(frozen=True)
class Options:
    """What changes the *set* of codes (text filter, paging and language only change what is shown)."""

    active_only: bool = False
    exclude_not_for_ui: bool = False
    system_version: tuple[tuple[str, str], ...] = ()  # default versions for systems the VS leaves open
    force_system_version: tuple[tuple[str, str], ...] = ()
    check_system_version: tuple[tuple[str, str], ...] = ()  # a different version in the VS is an error
    exclude_system: tuple[str, ...] = ()  # system or system|version left out of the expansion


# Codes a compose may visit in all (every include, exclude, filter and nested value set counted): 20 passes over
# a 100,000-code system; the DHP packages' largest compose visits about 30,000.
MAX_COMPOSE_WORK = 2_000_000


@dataclass
class Expansion:
    url: str | None
    version: str | None
    items: list[Item] = field(default_factory=list)
    index: dict[tuple[str, str], Item] = field(default_factory=dict)
    open_systems: set[str] = field(default_factory=set)  # included as a whole (or by filter) but not loaded
    used: dict[str, None] = field(default_factory=dict)  # used code systems, canonical url|version
    warnings: list[str] = field(default_factory=list)
    _vocab: dict[str, list[int]] | None = None
    _sorted: list[str] | None = None
    _by_code: dict[str, list[Item]] | None = None
    _prefix_cache: dict[str, set[int]] = field(default_factory=dict)
    # Rendered full (unpaged, unfiltered) contains lists, by how they were rendered: the big drop-downs
    # (mahalla-vs, 9,452 codes) are fetched whole again and again in the same few languages.
    _rendered: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict)
    # When the expansion is exactly one whole code system, its word index is kept with that system's items
    # and survives expansion-cache drops (API writes elsewhere) and other value sets over the same system.
    source: SystemItems | None = None
    work: int = 0  # codes visited while evaluating the compose (see spend)

    def spend(self, n: int, where: str) -> None:
        """Count ``n`` units of compose work (codes visited); refuse a definition that needs too many.

        Each include/exclude is bounded by its code system, but a compose may repeat them by the thousand
        (3,000 filtered includes of a 100,000-code system ran for minutes in the event loop)."""
        self.work += n
        if self.work > MAX_COMPOSE_WORK:
            raise FHIRError(422, f"ValueSet {self.url or '(inline)'} is too costly to expand: its compose visits "
                                 f"more than {MAX_COMPOSE_WORK:,} codes (at {where})", "too-costly",
                            expression=where, message_id="vs-too-costly")

    def add(self, it: Item) -> None:
        key = (it.system, it.code)
        if key not in self.index:
            self.index[key] = it
            self.items.append(it)

    def by_code(self, code: str) -> list[Item]:
        if self._by_code is None:
            m: dict[str, list[Item]] = {}
            for it in self.items:
                m.setdefault(it.code, []).append(it)
            self._by_code = m
        return self._by_code.get(code, [])

    def codes(self) -> set[tuple[str, str]]:
        return set(self.index)

    # -- type-ahead: every query word must start a word of some designation (or the code)

    def _build_vocab(self) -> None:
        src = self.source
        if src is not None and len(src) == len(self.items):
            if src.vocab is None:
                src.vocab = _vocab(list(src))
            self._vocab, self._sorted = src.vocab
            return
        self._vocab, self._sorted = _vocab(self.items)

    def _prefix(self, q: str) -> set[int]:
        got = self._prefix_cache.get(q)
        if got is not None:
            return got
        assert self._vocab is not None and self._sorted is not None
        out: set[int] = set()
        sv, vocab = self._sorted, self._vocab
        i = bisect_left(sv, q)
        while i < len(sv) and sv[i].startswith(q):
            out.update(vocab[sv[i]])
            i += 1
        if len(self._prefix_cache) > 512:
            self._prefix_cache.clear()
        self._prefix_cache[q] = out
        return out

    def search(self, text: str) -> list[int] | None:
        """Positions of the items matching a type-ahead filter, in expansion order (None: no filter)."""
        qwords = sorted(set(words(text)), key=len, reverse=True)
        if not qwords:
            return None
        if self._vocab is None:
            self._build_vocab()
        hits: set[int] | None = None
        for q in qwords:
            s = self._prefix(q)
            hits = set(s) if hits is None else hits & s
            if not hits:
                return []
        return sorted(hits or ())


def _vocab(items: list[Item]) -> tuple[dict[str, list[int]], list[str]]:
    """word → positions of the items having that word (a position may repeat), and the sorted words."""
    vocab: defaultdict[str, list[int]] = defaultdict(list)
    with no_gc():
        tokens = words_many([" ".join(dict.fromkeys(it.texts())) for it in items])
        for i, ws in enumerate(tokens):
            for w in ws:
                vocab[w].append(i)
        return dict(vocab), sorted(vocab)


# ---------------------------------------------------------------- compose evaluation


def expand_compose(eng: Terminology, vs: dict[str, Any], opts: Options, stack: tuple[str, ...]) -> Expansion:
    exp = Expansion(vs.get("url"), vs.get("version"))
    compose = vs.get("compose")
    if not isinstance(compose, dict):
        given = (vs.get("expansion") or {}).get("contains")
        if isinstance(given, list):
            _from_given_expansion(eng, exp, given)
            return exp
        raise FHIRError(422, f"ValueSet {vs.get('url') or vs.get('id')} has neither compose nor expansion",
                        "invalid", message_id="vs-no-compose")
    inactive_ok = compose.get("inactive") is not False and not opts.active_only
    for i, inc in enumerate(compose.get("include") or []):
        items, open_ = _eval_set(eng, exp, inc, opts, stack, f"ValueSet.compose.include[{i}]")
        exp.spend(len(items) + 1, f"ValueSet.compose.include[{i}]")
        exp.open_systems |= open_
        if not exp.items and isinstance(items, SystemItems):
            # A whole code system first: copy its prebuilt list and index (C-speed) instead of adding one by one.
            exp.items = list(items)
            exp.index = dict(items.index)
            exp.source = items
            continue
        if items:
            exp.source = None
        for it in items:
            exp.add(it)
    excluded: set[tuple[str, str]] = set()
    for i, exc in enumerate(compose.get("exclude") or []):
        items, _ = _eval_set(eng, exp, exc, opts, stack, f"ValueSet.compose.exclude[{i}]")
        exp.spend(len(items) + 1, f"ValueSet.compose.exclude[{i}]")
        excluded.update((it.system, it.code) for it in items)
    dropped = _excluded_systems(opts.exclude_system)
    if excluded or not inactive_ok or opts.exclude_not_for_ui or dropped:
        keep = [it for it in exp.items
                if (it.system, it.code) not in excluded and (inactive_ok or not it.inactive)
                and not (opts.exclude_not_for_ui and it.abstract)
                and not (it.system in dropped and dropped[it.system] in (None, it.version))]
        exp.items = keep
        exp.index = {(it.system, it.code): it for it in keep}
    if exp.source is not None and len(exp.items) != len(exp.source):
        exp.source = None
    return exp


def _excluded_systems(refs: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for r in refs:
        url, _, version = r.partition("|")
        out[url] = version or None
    return out


def _from_given_expansion(eng: Terminology, exp: Expansion, contains: list[dict[str, Any]]) -> None:
    for c in contains:
        if not isinstance(c, dict):
            continue
        if c.get("code") and c.get("system"):
            cs = eng.code_system(c["system"], c.get("version"))
            con = cs.get(c["code"]) if cs is not None else None
            it = Item(c["system"], c.get("version"), c["code"], con, c.get("display"), c.get("designation"))
            if c.get("abstract") is True:
                it.abstract = True
            if c.get("inactive") is True:
                it.inactive = True
            exp.add(it)
        _from_given_expansion(eng, exp, c.get("contains") or [])


def _eval_set(eng: Terminology, exp: Expansion, inc: dict[str, Any], opts: Options, stack: tuple[str, ...],
              where: str) -> tuple[list[Item], set[str]]:
    """The codes of one include/exclude entry, in order, and the systems it covers that are not loaded."""
    open_: set[str] = set()
    nested: list[Expansion] = []
    for ref in inc.get("valueSet") or []:
        sub = eng.expansion_for(ref, opts, stack)
        exp.spend(len(sub.items) + 1, where)  # the intersection below walks it
        nested.append(sub)
        exp.used.update(sub.used)
        exp.warnings.extend(sub.warnings)
    system = inc.get("system")
    if not system:
        if not nested:
            raise FHIRError(422, f"{where} names neither a system nor a value set", "invalid",
                            expression=where, message_id="vs-include-empty")
        first, rest = nested[0], nested[1:]
        items = [it for it in first.items if all((it.system, it.code) in n.index for n in rest)]
        for n in nested:
            open_ |= n.open_systems
        return items, open_
    system = eng.canonical_system(system)
    forced = dict(opts.force_system_version)
    required = dict(opts.check_system_version).get(system)
    if required and inc.get("version") and inc["version"] != required:
        raise FHIRError(422, f"{where} uses {system} version {inc['version']}, but check-system-version asks "
                             f"for {required}", "exception", expression=where, message_id="vs-version-mismatch")
    version = forced.get(system) or inc.get("version") or dict(opts.system_version).get(system) or required
    cs = eng.code_system(system, version)
    if cs is None and version:
        cs = eng.code_system(system)
        if cs is not None:
            exp.warnings.append(f"{system} version {version} is not loaded; used version {cs.version}")
    concepts = inc.get("concept") or []
    filters = inc.get("filter") or []
    items: list[Item] = []
    if cs is None or cs.content == "not-present":
        # Not loaded here: only enumerated codes can be listed (their validity is not checked).
        stub = eng.supplement_stub(system)
        codes = _enumerated(concepts, filters)
        if codes is None:
            open_.add(system)
        else:
            for code, disp, desig in codes:
                con = stub.get(code) if stub is not None else None
                items.append(Item(system, version, code, con, disp, desig))
    else:
        exp.used[cs.canonical] = None
        if concepts:
            for c in concepts:
                code = c.get("code") if isinstance(c, dict) else None
                if not isinstance(code, str):
                    continue
                con = cs.get(code)
                if con is None:
                    if cs.complete:
                        exp.warnings.append(f"{where}: code {code!r} is not in {cs.canonical}; left out")
                        continue
                items.append(Item(system, cs.version, con.code if con else code, con, c.get("display"),
                                  c.get("designation")))
        elif filters:
            selected: set[str] | None = None
            for j, f in enumerate(filters):
                exp.spend(len(cs.order), where)
                prop = f.get("property") if isinstance(f, dict) else None
                if isinstance(prop, str) and not cs.knows_property(prop):
                    exp.warnings.append(f"{where}.filter[{j}]: property {prop!r} is not defined by {cs.canonical}")
                s = eval_filter(cs, f, f"{where}.filter[{j}]")
                if selected is None:
                    selected = s
                else:
                    selected = selected | s if _code_list(filters) else selected & s
            sel = selected or set()
            items = [Item(system, cs.version, c.code, c) for c in cs.order if c.code in sel]
        else:
            items = all_items(cs)
            if not cs.complete:
                open_.add(system)
    if nested:
        items = [it for it in items if all((it.system, it.code) in n.index for n in nested)]
    return items, open_


def _enumerated(concepts: list[Any], filters: list[Any]) -> list[tuple[str, str | None, Any]] | None:
    """Codes listed by concept or by ``code``/``concept`` ``=``/``in`` filters, or None if not enumerable."""
    if concepts:
        return [(c["code"], c.get("display"), c.get("designation")) for c in concepts
                if isinstance(c, dict) and isinstance(c.get("code"), str)]
    if not filters:
        return None
    sets: list[list[str]] = []
    for f in filters:
        if not isinstance(f, dict) or f.get("property") not in ("code", "concept"):
            return None
        if f.get("op") == "=":
            sets.append([str(f.get("value", ""))])
        elif f.get("op") == "in":
            sets.append([v.strip() for v in str(f.get("value", "")).split(",") if v.strip()])
        else:
            return None
    if _code_list(filters):
        codes = [s[0] for s in sets]
    else:  # filters of one include are ANDed
        codes = [c for c in sets[0] if all(c in s for s in sets[1:])]
    return [(c, None, None) for c in dict.fromkeys(codes)]


def _code_list(filters: list[Any]) -> bool:
    """Several ``code = X`` filters in one include.

    The spec ANDs the filters of an include, which would make this empty; the DHP packages use it to list
    codes (loinc-birth-vs lists ten LOINC codes this way), so it is read as a list — the same whether or not
    the code system is loaded here.
    """
    return len(filters) > 1 and all(isinstance(f, dict) and f.get("property") in ("code", "concept")
                                    and f.get("op") == "=" for f in filters)


_HIERARCHY_PROPS = frozenset({"concept", "code"})


def eval_filter(cs: CodeSystemIndex, f: dict[str, Any], where: str) -> set[str]:
    prop, op, value = f.get("property"), f.get("op"), f.get("value")
    if not isinstance(prop, str) or not isinstance(op, str) or not isinstance(value, str):
        raise FHIRError(422, f"{where}: a filter needs property, op and value", "invalid", expression=where,
                        message_id="vs-filter-invalid")
    if op not in FILTER_OPS:
        raise FHIRError(422, f"{where}: filter operator {op!r} is not supported", "not-supported",
                        expression=where, message_id="vs-filter-op")
    concepts = cs.concepts
    if op in ("is-a", "descendent-of", "is-not-a", "descendent-leaf", "generalizes", "child-of"):
        con = cs.get(value)
        if con is None:
            return set(concepts) if op == "is-not-a" else set()
        code = con.code
        if op == "is-a":
            return {code} | cs.descendants(code)
        if op == "descendent-of":
            return set(cs.descendants(code))
        if op == "is-not-a":
            return set(concepts) - cs.descendants(code) - {code}
        if op == "descendent-leaf":
            return {c for c in cs.descendants(code) if not concepts[c].children}
        if op == "generalizes":
            return {code} | cs.ancestors(code)
        return set(con.children)
    getter = _getter(cs, prop)
    if op == "=":
        if prop in _HIERARCHY_PROPS:
            return {value} if value in concepts else set()
        return {c.code for c in cs.order if value in getter(c)}
    if op in ("in", "not-in"):
        wanted = {v.strip() for v in value.split(",") if v.strip()}
        hit = {c.code for c in cs.order if wanted & set(getter(c))}
        return hit if op == "in" else set(concepts) - hit
    if op == "regex":
        return _regex_matches(cs, getter, value, where)
    # exists
    want = value.lower() == "true"
    return {c.code for c in cs.order if bool(getter(c)) == want}


# Python's backtracking regex engine can take exponential time (nested or ambiguous repeats) or high
# polynomial time (many ``.*``) per string, and a filter runs over every concept in the event loop: one
# ``(.*a){12}`` in an inline ValueSet froze the whole server. Such patterns are refused, and the rest get a
# time budget.
_REGEX_BUDGET_S = 3.0


def _regex_matches(cs: CodeSystemIndex, getter: Callable[[Concept], list[str]], value: str,
                   where: str) -> set[str]:
    def refuse(why: str, code: str = "too-costly") -> FHIRError:
        return FHIRError(422, f"{where}: regex {value!r} {why}", code, expression=where,
                         message_id="vs-filter-regex")

    try:
        rx = re.compile(value)
        parsed = _sre.parse(value)
    except (re.error, RecursionError, OverflowError) as e:
        raise refuse(f"is not valid: {e}", "invalid") from None
    counts = [0]
    why = _regex_risk(parsed, False, counts)
    if why is None and counts[0] > _REGEX_MAX_UNBOUNDED:
        why = f"more than {_REGEX_MAX_UNBOUNDED} unbounded repeats"
    if why:
        raise refuse(f"is refused: it has {why}, which can take very long to match")
    out: set[str] = set()
    start = time.monotonic()
    for i, c in enumerate(cs.order):
        if any(rx.fullmatch(v) for v in getter(c)):
            out.add(c.code)
        if i % 256 == 255 and time.monotonic() - start > _REGEX_BUDGET_S:
            raise refuse(f"took more than {_REGEX_BUDGET_S:g} s over {cs.canonical}; simplify it")
    return out


def _getter(cs: CodeSystemIndex, prop: str) -> Callable[[Concept], list[str]]:
    if prop in _HIERARCHY_PROPS:
        return lambda c: [c.code]
    if prop == "display":
        return lambda c: [c.display] if c.display else []
    if prop == "definition":
        return lambda c: [c.definition] if c.definition else []
    if prop in ("parent", *cs._parent_props):
        return lambda c: c.parents
    if prop in ("child", *cs._child_props):
        return lambda c: c.children
    if prop == "inactive":
        return lambda c: ["true" if c.inactive else "false"]
    if prop in ("notSelectable", "abstract"):
        return lambda c: ["true" if c.abstract else "false"]
    return lambda c: [value_text(v) for v in c.property_values(prop)]


# ---------------------------------------------------------------- rendering ($expand output)


@dataclass
class RenderOptions:
    langs: tuple[str, ...] = ()
    text_filter: str | None = None
    offset: int = 0
    count: int | None = None
    include_designations: bool = False
    designations: tuple[str, ...] = ()  # language codes or system|code of a use
    properties: tuple[str, ...] = ()
    exclude_nested: bool = True
    include_definition: bool = False
    max_expansion: int = 10_000
    echo: list[dict[str, Any]] = field(default_factory=list)  # expansion.parameter entries to echo


_KEEP = ("resourceType", "id", "meta", "language", "url", "identifier", "version", "name", "title", "status",
         "experimental", "date", "publisher", "description", "immutable")


def render(exp: Expansion, vs: dict[str, Any], ro: RenderOptions) -> dict[str, Any]:
    positions = exp.search(ro.text_filter) if ro.text_filter else None
    total = len(exp.items) if positions is None else len(positions)
    if ro.count is None and total - ro.offset > ro.max_expansion:
        raise FHIRError(422, f"The expansion has {total} codes, more than the limit of {ro.max_expansion}; "
                             "ask for a page with 'count' (and 'offset') or narrow it with 'filter'",
                        "too-costly", message_id="expansion-too-costly")
    count = ro.count if ro.count is not None else total
    count = min(count, ro.max_expansion)
    if positions is None:
        page = exp.items[ro.offset:ro.offset + count]
    else:
        page = [exp.items[i] for i in positions[ro.offset:ro.offset + count]]
    langs = ro.langs
    want_desig = ro.include_designations or bool(ro.designations)
    props = ro.properties
    nested = (not ro.exclude_nested and ro.count is None and ro.offset == 0 and positions is None)
    whole = positions is None and ro.offset == 0 and len(page) == len(exp.items) and not nested
    key = (langs, want_desig, ro.designations, props)
    contains = exp._rendered.get(key) if whole else None
    if contains is None:
        with no_gc():
            if want_desig or props:
                contains = [_render_item(it, langs, want_desig, ro.designations, props) for it in page]
            else:
                contains = _render_plain(page, langs)
        if nested:
            contains = _nest(page, contains)
        elif whole and len(contains) >= 1000:
            if len(exp._rendered) >= 8:
                exp._rendered.clear()
            exp._rendered[key] = contains
    out = {k: vs[k] for k in _KEEP if k in vs}
    out["resourceType"] = "ValueSet"
    if ro.include_definition and "compose" in vs:
        out["compose"] = vs["compose"]
    params = list(ro.echo)
    for canonical in exp.used:
        params.append({"name": "used-codesystem", "valueUri": canonical})
    for w in exp.warnings:
        params.append({"name": "warning", "valueString": w})
    expansion: dict[str, Any] = {
        "identifier": "urn:uuid:" + str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "total": total,
    }
    if ro.offset or ro.count is not None:
        expansion["offset"] = ro.offset
    if params:
        expansion["parameter"] = params
    if props:
        expansion["property"] = [{"code": p, "uri": _property_uri(p)} for p in props]
    if contains:
        expansion["contains"] = contains
    out["expansion"] = expansion
    return out


def _property_uri(code: str) -> str:
    return "http://hl7.org/fhir/concept-properties#" + code


def _render_item(it: Item, langs: tuple[str, ...], want_desig: bool, desig_filter: tuple[str, ...],
                 props: tuple[str, ...]) -> dict[str, Any]:
    d: dict[str, Any] = {"system": it.system}
    if it.abstract:
        d["abstract"] = True
    if it.inactive:
        d["inactive"] = True
    if it.version:
        d["version"] = it.version
    d["code"] = it.code
    disp = it.display_for(langs)
    if disp is not None:
        d["display"] = disp
    if want_desig:
        ds = [x for x in it.all_designations() if designation_matches(x, desig_filter)]
        if ds:
            d["designation"] = ds
    if props and it.concept is not None:
        pv = concept_properties(it.concept, props)
        if pv:
            d["property"] = pv
    return d


def _render_plain(page: list[Item], langs: tuple[str, ...]) -> list[dict[str, Any]]:
    """``_render_item`` without designations or properties, inlined: the path of big drop-downs."""
    out: list[dict[str, Any]] = []
    append = out.append
    for it in page:
        d: dict[str, Any] = {"system": it.system}
        if it.abstract:
            d["abstract"] = True
        if it.inactive:
            d["inactive"] = True
        if it.version:
            d["version"] = it.version
        d["code"] = it.code
        con = it.concept
        if con is not None and it.display is None and not it.designations:
            disp = None
            by_lang = con.by_lang
            for lang in langs:
                disp = by_lang.get(lang)
                if disp is not None:
                    break
            if disp is None:
                disp = con.display if con.display is not None else (
                    con.designations[0]["value"] if con.designations else None)
        else:
            disp = it.display_for(langs)
        if disp is not None:
            d["display"] = disp
        append(d)
    return out


def designation_matches(d: dict[str, Any], wanted: tuple[str, ...]) -> bool:
    if not wanted:
        return True
    lang = str(d.get("language", "")).lower()
    use = d.get("use") or {}
    for w in wanted:
        if "|" in w:
            s, _, c = w.partition("|")
            if use.get("code") == c and (not s or use.get("system") == s):
                return True
        elif lang == w.lower() or lang.split("-", 1)[0] == w.lower():
            return True
    return False


def concept_properties(con: Concept, wanted: Iterable[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in wanted:
        if p == "parent":
            out.extend({"code": "parent", "valueCode": c} for c in con.parents)
        elif p == "child":
            out.extend({"code": "child", "valueCode": c} for c in con.children)
        elif p == "inactive":
            out.append({"code": "inactive", "valueBoolean": con.inactive})
        elif p in ("notSelectable", "abstract"):
            out.append({"code": p, "valueBoolean": con.abstract})
        elif p == "definition":
            if con.definition:
                out.append({"code": "definition", "valueString": con.definition})
        elif p == "display":
            if con.display:
                out.append({"code": "display", "valueString": con.display})
        else:
            out.extend({k: v for k, v in prop.items() if k == "code" or k.startswith("value")}
                       for prop in con.properties if prop.get("code") == p)
    return out


def _nest(page: list[Item], rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put each code under its first parent that is also in the expansion (same system, listed earlier)."""
    pos = {(it.system, it.code): i for i, it in enumerate(page)}
    roots: list[dict[str, Any]] = []
    for i, (it, r) in enumerate(zip(page, rendered, strict=True)):
        parent_idx = None
        if it.concept is not None:
            for p in it.concept.parents:
                j = pos.get((it.system, p))
                if j is not None and j < i:
                    parent_idx = j
                    break
        if parent_idx is None:
            roots.append(r)
        else:
            rendered[parent_idx].setdefault("contains", []).append(r)
    return roots
