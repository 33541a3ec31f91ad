"""The terminology engine: one per process, built from the conformance :class:`Registry`.

Indexes are built lazily per CodeSystem; expansions are cached per ValueSet ``url|version`` + options;
``validate_code`` answers are cached per (value set, system, code, display, version). When the registry's
API overlay changes, the engine drops whatever could depend on the changed resources (see :meth:`_changed`),
so a CodeSystem or ValueSet written through the REST API takes effect at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dhp.conformance import Registry
from dhp.errors import FHIRError, Issue
from dhp.terminology import ucum
from dhp.terminology.codesystem import CONCEPT_PROPERTIES, CodeSystemIndex, Concept
from dhp.terminology.conceptmap import Match, map_systems, scope_of, translate
from dhp.terminology.shape import shape_problem
from dhp.terminology.text import no_gc, normalize
from dhp.terminology.types import CodeCheck
from dhp.terminology.valueset import (
    FILTER_OPS,
    Expansion,
    Item,
    Options,
    RenderOptions,
    concept_properties,
    expand_compose,
    render,
)

_CHECK_CACHE_MAX = 200_000
_EXPANSION_CACHE_MAX = 256
_WS = re.compile(r"\s+")
RELATIONSHIPS = frozenset({"related-to", "equivalent", "source-is-narrower-than-target",
                           "source-is-broader-than-target", "not-related-to"})

log = logging.getLogger("dhp.terminology")


def _norm_display(s: str) -> str:
    return _WS.sub(" ", normalize(s)).strip()


@dataclass
class Verdict:
    """The full answer to a validate-code question (the operation renders it; CodeCheck is its summary)."""

    result: bool | None
    code: str
    system: str | None
    version: str | None = None
    display: str | None = None
    issues: list[Issue] = field(default_factory=list)
    inactive: bool = False
    system_known: bool = True

    def message(self) -> str:
        return "; ".join(i.diagnostics for i in self.issues if i.severity in ("error", "fatal", "warning"))

    def to_check(self) -> CodeCheck:
        return CodeCheck(self.result, self.message(), self.display, self.system_known,
                         tuple(f"{i.severity}: {i.diagnostics}" for i in self.issues))


class Terminology:
    """CodeSystem / ValueSet / ConceptMap / NamingSystem engine."""

    def __init__(self, registry: Registry, *, max_expansion: int = 10_000) -> None:
        self.registry = registry
        self.max_expansion = max_expansion
        self._cs: dict[tuple[str, str | None], tuple[CodeSystemIndex | None, Any, tuple[Any, ...]]] = {}
        self._stubs: dict[str, CodeSystemIndex | None] = {}
        self._supp: dict[str, list[tuple[str, str | None]]] | None = None
        self._exp: dict[tuple[str, Options], Expansion] = {}
        self._checks: dict[tuple[Any, ...], CodeCheck] = {}
        self._canon: dict[str, str] = {}
        self._aliases: dict[str, str] | None = None
        self._maps_by_system: dict[str, list[str]] | None = None
        #: API-written definitions whose JSON types this engine cannot read (stored before write-time checks
        #: existed): treated as not known here, never a 500 on every use. id → resource (kept alive).
        self._unusable: dict[int, dict[str, Any]] = {}
        self._find_unusable()
        registry.listeners.append(self._changed)

    # ------------------------------------------------------------------ cache upkeep

    def _find_unusable(self) -> None:
        bad: dict[int, dict[str, Any]] = {}
        for rtype in ("CodeSystem", "ValueSet", "ConceptMap"):
            for res in self.registry.overlay(rtype):
                problem = shape_problem(res)
                if problem is not None:
                    log.warning("%s %s is stored with a structure this server cannot use (%s): treated as "
                                "not known here", rtype, res.get("url") or res.get("id"), problem)
                    bad[id(res)] = res
        self._unusable = bad

    def _usable(self, res: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if res is None or id(res) in self._unusable else res

    def _changed(self) -> None:
        """The registry overlay changed: keep only code system indexes built from the very same resources."""
        self._find_unusable()
        self._supp = None
        keep: dict[tuple[str, str | None], tuple[CodeSystemIndex | None, Any, tuple[Any, ...]]] = {}
        for key, (idx, res, supps) in list(self._cs.items()):
            if idx is None:
                continue
            now = self._resolve_cs(*key)
            if now is res and tuple(self._supplement_resources(key[0])) == supps:
                keep[key] = (idx, res, supps)
        self._cs = keep
        self._stubs = {}
        self._exp = {}
        self._checks = {}
        self._canon = {}
        self._aliases = None
        self._maps_by_system = None

    def clear(self) -> None:
        """Drop every cache (tests and benchmarks use this to measure cold paths)."""
        self._cs = {}
        self._stubs = {}
        self._supp = None
        self._exp = {}
        self._checks = {}
        self._canon = {}
        self._aliases = None
        self._maps_by_system = None

    # ------------------------------------------------------------------ code systems

    def _resolve_cs(self, url: str, version: str | None) -> dict[str, Any] | None:
        with no_gc():  # the first resolve parses the file: 12,551 concepts are ~60,000 objects
            res = self._usable(self.registry.resolve(url + ("|" + version if version else ""), "CodeSystem"))
        if res is None or res.get("content") == "supplement":
            return None
        return res

    def _supplement_map(self) -> dict[str, list[tuple[str, str | None]]]:
        if self._supp is None:
            m: dict[str, list[tuple[str, str | None]]] = {}
            seen: set[tuple[str, str | None]] = set()
            for meta in self.registry.iter_meta("CodeSystem"):
                target = meta.get("supplements")
                url = meta.get("url")
                if not isinstance(target, str) or not url:
                    continue
                key = (url, meta.get("version"))
                if key in seen:  # the overlay copy comes first and wins
                    continue
                seen.add(key)
                m.setdefault(target.split("|", 1)[0], []).append(key)
            self._supp = m
        return self._supp

    def _supplement_resources(self, url: str) -> list[dict[str, Any]]:
        out = []
        for s_url, s_ver in self._supplement_map().get(url, ()):
            r = self._usable(self.registry.resolve(s_url + ("|" + s_ver if s_ver else ""), "CodeSystem"))
            if r is not None and r.get("content") == "supplement":
                out.append(r)
        return out

    def code_system(self, url: str, version: str | None = None) -> CodeSystemIndex | None:
        """The index of a loaded CodeSystem (supplements merged), or None when it is not known here."""
        key = (url, version or None)
        got = self._cs.get(key)
        if got is not None:
            return got[0]
        res = self._resolve_cs(url, version or None)
        supps = tuple(self._supplement_resources(url)) if res is not None else ()
        with no_gc():
            idx = CodeSystemIndex(res, list(supps)) if res is not None else None
        self._cs[key] = (idx, res, supps)
        return idx

    def supplement_stub(self, url: str) -> CodeSystemIndex | None:
        """For a system not loaded here: what its supplements say about its codes (displays), if anything."""
        if url in self._stubs:
            return self._stubs[url]
        supps = self._supplement_resources(url)
        stub = CodeSystemIndex({"url": url, "content": "not-present"}, supps) if supps else None
        self._stubs[url] = stub
        return stub

    def canonical_system(self, system: str) -> str:
        """The canonical URL of a code system named by URL, OID (``urn:oid:``) or a NamingSystem alias."""
        got = self._canon.get(system)
        if got is not None:
            return got
        out = system
        if system != ucum.UCUM and self.registry.resolve(system, "CodeSystem") is None:
            out = self._alias_map().get(system, system)
        self._canon[system] = out
        return out

    def _alias_map(self) -> dict[str, str]:
        if self._aliases is None:
            m: dict[str, str] = {}
            for meta in self.registry.iter_meta("NamingSystem"):
                if meta.get("kind") != "codesystem" or not meta.get("url"):
                    continue
                ns = self.registry.resolve(meta["url"], "NamingSystem")
                if not ns:
                    continue
                ids = [u for u in ns.get("uniqueId") or [] if isinstance(u, dict) and u.get("value")]
                preferred = next((u["value"] for u in ids if u.get("type") == "uri" and u.get("preferred")),
                                 None) or next((u["value"] for u in ids if u.get("type") == "uri"), None)
                if not preferred:
                    continue
                for u in ids:
                    v = u["value"]
                    if u.get("type") == "oid" and not v.startswith("urn:oid:"):
                        v = "urn:oid:" + v
                    if v != preferred:
                        m.setdefault(v, preferred)
            self._aliases = m
        return self._aliases

    # ------------------------------------------------------------------ value sets and expansions

    def value_set(self, url: str, version: str | None = None) -> dict[str, Any] | None:
        vs = self._usable(self.registry.resolve(url + ("|" + version if version else ""), "ValueSet"))
        if vs is None and "?fhir_vs" in url:
            vs = self._implicit_vs(url)
        return vs

    def _implicit_vs(self, url: str) -> dict[str, Any] | None:
        """``<system>?fhir_vs`` (all codes) and ``<system>?fhir_vs=isa/<code>`` (a code and its descendants)."""
        base, _, q = url.partition("?")
        inc: dict[str, Any] = {"system": base}
        if q.startswith("fhir_vs=isa/"):
            inc["filter"] = [{"property": "concept", "op": "is-a", "value": q[len("fhir_vs=isa/"):]}]
        elif q != "fhir_vs":
            return None
        return {"resourceType": "ValueSet", "url": url, "status": "active", "compose": {"include": [inc]}}

    def expansion_for(self, ref: str, opts: Options = Options(), stack: tuple[str, ...] = ()) -> Expansion:
        """The (cached) full expansion of the ValueSet ``ref`` (``url`` or ``url|version``)."""
        url, _, version = ref.partition("|")
        if url in stack:
            # Checked before resolving: an inline value set that includes its own url is not in the registry,
            # and "not known here" would hide the real problem.
            raise FHIRError(422, f"ValueSet {url} includes itself (via {' → '.join(stack)})", "processing",
                            message_id="vs-circular")
        vs = self.value_set(url, version or None)
        if vs is None:
            if stack:
                raise FHIRError(422, f"ValueSet {ref} (included by {stack[-1]}) is not known here", "not-found",
                                message_id="vs-unknown")
            raise FHIRError(404, f"ValueSet {ref} is not known here", "not-found", message_id="vs-unknown")
        return self.expansion_of(vs, opts, stack)

    def expansion_of(self, vs: dict[str, Any], opts: Options = Options(),
                     stack: tuple[str, ...] = ()) -> Expansion:
        url = vs.get("url")
        key_url = (url or "") + "|" + (vs.get("version") or "")
        if url and url in stack:
            raise FHIRError(422, f"ValueSet {url} includes itself (via {' → '.join(stack)})", "processing",
                            message_id="vs-circular")
        # Only registry value sets are cached: an inline one (POST valueSet=…) may differ under the same url.
        cacheable = bool(url) and self.value_set(url, vs.get("version")) is vs
        if cacheable:
            got = self._exp.get((key_url, opts))
            if got is not None:
                return got
        with no_gc():
            exp = expand_compose(self, vs, opts, (*stack, url or "(inline)"))
        if cacheable:
            if len(self._exp) >= _EXPANSION_CACHE_MAX:
                self._exp.clear()
            self._exp[(key_url, opts)] = exp
        return exp

    def expand(self, vs: dict[str, Any] | str, ro: RenderOptions | None = None, opts: Options = Options(),
               version: str | None = None) -> dict[str, Any]:
        """``$expand``: the ValueSet with its expansion (paged, text-filtered, in the requested language)."""
        if isinstance(vs, str):
            res = self.value_set(vs, version)
            if res is None:
                raise FHIRError(404, f"ValueSet {vs}{'|' + version if version else ''} is not known here",
                                "not-found", message_id="vs-unknown")
            vs = res
        ro = ro or RenderOptions(max_expansion=self.max_expansion)
        exp = self.expansion_of(vs, opts)
        if exp.open_systems:
            names = ", ".join(sorted(exp.open_systems))
            raise FHIRError(422, f"ValueSet {vs.get('url') or vs.get('id')} draws on code systems not loaded "
                                 f"here ({names}); it cannot be expanded", "not-supported",
                            message_id="vs-unknown-system")
        return render(exp, vs, ro)

    def expand_codes(self, valueset_url: str) -> set[tuple[str, str]] | None:
        """(system, code) pairs of a value set, for search ``:in``/``:not-in``; None if it cannot be listed."""
        try:
            exp = self.expansion_for(valueset_url)
        except FHIRError:
            return None
        if exp.open_systems:
            return None
        return exp.codes()

    # ------------------------------------------------------------------ hierarchy (search :below / :above)

    def subsumed_by(self, system: str, code: str) -> set[str] | None:
        """``code`` and every code below it; ``{code}`` for a code the system lacks; None when the code system
        is not loaded here (the hierarchy is unknown: callers must not treat that as an exact match)."""
        cs = self.code_system(self.canonical_system(system))
        if cs is None:
            return None
        con = cs.get(code)
        if con is None:
            return {code}
        return {con.code} | cs.descendants(con.code)

    def ancestors(self, system: str, code: str) -> set[str] | None:
        """``code`` and every code above it; ``{code}`` for a code the system lacks; None when the code system
        is not loaded here."""
        cs = self.code_system(self.canonical_system(system))
        if cs is None:
            return None
        con = cs.get(code)
        if con is None:
            return {code}
        return {con.code} | cs.ancestors(con.code)

    # ------------------------------------------------------------------ validate-code

    def validate_code(self, system: str | None, code: str, valueset: str | None = None, *,
                      display: str | None = None, version: str | None = None) -> CodeCheck:
        """Is ``system#code`` valid (and in ``valueset``)? Cached; see :class:`CodeCheck` for ``None``."""
        key = (valueset, system, code, display, version)
        got = self._checks.get(key)
        if got is not None:
            return got
        res = self.check(system, code, valueset, display=display, version=version).to_check()
        if len(self._checks) >= _CHECK_CACHE_MAX:
            self._checks.clear()
        self._checks[key] = res
        return res

    def check(self, system: str | None, code: str, valueset: str | dict[str, Any] | None = None, *,
              display: str | None = None, version: str | None = None, langs: tuple[str, ...] = (),
              abstract_ok: bool = True, vs_version: str | None = None, opts: Options = Options(),
              path: str = "Coding") -> Verdict:
        if not isinstance(code, str) or not code:
            return Verdict(False, str(code or ""), system, issues=[
                Issue("error", "invalid", "No code given", [f"{path}.code"], "code-missing")])
        sys = self.canonical_system(system) if system else None
        if valueset is None:
            if sys is None:
                return Verdict(None, code, None, system_known=False, issues=[Issue(
                    "warning", "not-found", f"Code '{code}' has no system, so it cannot be checked",
                    [f"{path}.system"], "system-missing")])
            return self._check_in_system(sys, code, version, display, langs, abstract_ok, None, path)
        if isinstance(valueset, str):
            vs = self.value_set(*_split(valueset)) if not vs_version else self.value_set(valueset, vs_version)
            vs_name = valueset
        else:
            vs, vs_name = valueset, valueset.get("url") or "(inline ValueSet)"
        if vs is None:
            return Verdict(None, code, sys, system_known=sys is not None and self._known(sys), issues=[Issue(
                "warning", "not-found", f"ValueSet {vs_name} is not known here; code not checked", [path],
                "vs-unknown")])
        try:
            exp = self.expansion_of(vs, opts)
        except FHIRError as e:
            return Verdict(None, code, sys, issues=[Issue(
                "warning", "processing", f"ValueSet {vs_name} cannot be expanded: {e}", [path],
                "vs-not-expandable")])
        if sys is None:
            cands = exp.by_code(code)
            if len(cands) == 1:
                sys = cands[0].system
            elif len(cands) > 1:
                return Verdict(False, code, None, issues=[Issue(
                    "error", "invalid", f"Code '{code}' without a system is ambiguous in ValueSet {vs_name}",
                    [f"{path}.system"], "code-ambiguous")])
            elif exp.open_systems:
                return Verdict(None, code, None, system_known=False, issues=[Issue(
                    "warning", "not-found", f"Code '{code}' has no system and ValueSet {vs_name} draws on code "
                    "systems not loaded here; not checked", [path], "system-missing")])
            else:
                return Verdict(False, code, None, issues=[Issue(
                    "error", "code-invalid", f"Code '{code}' is not in ValueSet {vs_name}", [f"{path}.code"],
                    "not-in-vs")])
        item = exp.index.get((sys, code))
        if item is None:
            cs = self.code_system(sys, version)
            con = cs.get(code) if cs is not None else None
            if con is not None and con.code != code:
                item = exp.index.get((sys, con.code))
        if item is not None:
            return self._check_in_system(sys, item.code, version, display, langs, abstract_ok, item, path)
        if sys in exp.open_systems:
            if sys == ucum.UCUM:
                return self._check_in_system(sys, code, version, display, langs, abstract_ok, None, path)
            return Verdict(None, code, sys, system_known=False, issues=[Issue(
                "warning", "not-found", f"Code system {sys} is not loaded here, so membership of '{code}' in "
                f"ValueSet {vs_name} cannot be checked", [f"{path}.system"], "unknown-system")])
        base = self._check_in_system(sys, code, version, None, langs, True, None, path)
        issues = [Issue("error", "code-invalid", f"Code '{sys}#{code}' is not in ValueSet {vs_name}",
                        [f"{path}.code"], "not-in-vs")]
        issues += [i for i in base.issues if i.severity in ("error", "warning") and i.message_id != "unknown-system"]
        return Verdict(False, code, sys, base.version, base.display, issues, base.inactive, base.system_known)

    def _known(self, sys: str) -> bool:
        cs = self.code_system(sys)
        return sys == ucum.UCUM or (cs is not None and cs.content != "not-present")

    def check_in_index(self, idx: CodeSystemIndex, code: str, display: str | None = None,
                       langs: tuple[str, ...] = (), abstract_ok: bool = True, path: str = "Coding") -> Verdict:
        """Check a code against a CodeSystem that is not (or not yet) in the registry (an inline one)."""
        return self._check_in_system(idx.url, code, None, display, langs, abstract_ok, None, path, idx)

    def _check_in_system(self, sys: str, code: str, version: str | None, display: str | None,
                         langs: tuple[str, ...], abstract_ok: bool, item: Item | None, path: str,
                         given: CodeSystemIndex | None = None) -> Verdict:
        if sys == ucum.UCUM:
            reason = ucum.check(code)
            if reason is None:
                return Verdict(True, code, sys, None, code)
            return Verdict(False, code, sys, issues=[Issue(
                "error", "code-invalid", f"'{code}' is not a valid UCUM unit: {reason}", [f"{path}.code"],
                "ucum-invalid")])
        issues: list[Issue] = []
        cs = given or self.code_system(sys, version)
        if cs is None and version:
            cs = self.code_system(sys)
            if cs is not None:
                issues.append(Issue("warning", "not-found", f"Version {version} of {sys} is not loaded here; "
                                    f"checked against version {cs.version or '(unversioned)'}",
                                    [f"{path}.version"], "system-version-unknown"))
        if cs is None or cs.content == "not-present":
            if item is not None:
                msg = (f"Code '{code}' is listed by the value set, but code system {sys} is not loaded here, "
                       "so the code itself is not checked")
            else:
                msg = f"Code system {sys} is not known here; code '{code}' not checked"
            return Verdict(None, code, sys, version, item.display_for(langs) if item else None, [
                *issues, Issue("warning", "not-found", msg, [f"{path}.system"], "unknown-system")],
                system_known=False)
        con = cs.get(code)
        if con is None:
            if cs.complete:
                return Verdict(False, code, sys, cs.version, None, [*issues, Issue(
                    "error", "code-invalid", f"Unknown code '{code}' in code system {cs.canonical}",
                    [f"{path}.code"], "code-unknown")])
            return Verdict(None, code, sys, cs.version, None, [*issues, Issue(
                "warning", "not-found", f"Code '{code}' is not in the {cs.content} copy of {cs.canonical} "
                "loaded here; not checked", [f"{path}.code"], "code-not-in-fragment")])
        result: bool | None = True
        shown = item.display_for(langs) if item is not None else con.display_for(langs)
        if con.inactive:
            issues.append(Issue("warning", "business-rule", f"Code '{code}' is inactive in {cs.canonical}",
                                [f"{path}.code"], "code-inactive"))
        if con.abstract and not abstract_ok:
            result = False
            issues.append(Issue("error", "business-rule", f"Code '{code}' is abstract (not selectable) in "
                                f"{cs.canonical}", [f"{path}.code"], "code-abstract"))
        if display is not None and display.strip():
            texts = [*con.all_texts(), *(item.texts() if item is not None else ())]
            if _norm_display(display) not in {_norm_display(t) for t in texts if t}:
                result = False
                options = "', '".join(dict.fromkeys(t for t in (con.display, *con.by_lang.values()) if t))
                issues.append(Issue("error", "invalid", f"Wrong display '{display}' for {sys}#{con.code}: "
                                    f"valid displays are '{options}'", [f"{path}.display"], "display-wrong"))
        return Verdict(result, con.code, sys, cs.version, shown, issues, con.inactive)

    # ------------------------------------------------------------------ lookup / subsumes

    def lookup(self, system: str, code: str, version: str | None = None, *, langs: tuple[str, ...] = (),
               properties: tuple[str, ...] = ()) -> dict[str, Any]:
        """``$lookup`` output as a Parameters resource."""
        sys = self.canonical_system(system)
        if sys == ucum.UCUM:
            reason = ucum.check(code)
            if reason is not None:
                raise FHIRError(404, f"'{code}' is not a valid UCUM unit: {reason}", "not-found",
                                expression="code", message_id="code-unknown")
            return _parameters([("name", "valueString", "Unified Code for Units of Measure (UCUM)"),
                                ("display", "valueString", code)])
        cs = self.code_system(sys, version)
        if cs is None or cs.content == "not-present":
            raise FHIRError(404, f"Code system {sys}{'|' + version if version else ''} is not known here",
                            "not-found", expression="system", message_id="cs-unknown")
        con = cs.get(code)
        if con is None:
            raise FHIRError(404, f"Code '{code}' is not in code system {cs.canonical}", "not-found",
                            expression="code", message_id="code-unknown")
        out: list[dict[str, Any]] = [{"name": "name", "valueString": cs.name}]
        if cs.version:
            out.append({"name": "version", "valueString": cs.version})
        disp = con.display_for(langs)
        if disp is not None:
            out.append({"name": "display", "valueString": disp})
        if con.definition and (not properties or "definition" in properties):
            out.append({"name": "definition", "valueString": con.definition})
        if not properties or "designation" in properties:
            for d in con.designations:
                parts: list[dict[str, Any]] = []
                if d.get("language"):
                    parts.append({"name": "language", "valueCode": d["language"]})
                if d.get("use"):
                    parts.append({"name": "use", "valueCoding": d["use"]})
                parts.append({"name": "value", "valueString": d["value"]})
                out.append({"name": "designation", "part": parts})
        wanted = properties or self._default_properties(cs, con)
        for p in concept_properties(con, [w for w in wanted if w not in ("designation", "definition", "display")]):
            parts = [{"name": "code", "valueCode": p["code"]}]
            parts += [{"name": "value", k: v} for k, v in p.items() if k.startswith("value")]
            out.append({"name": "property", "part": parts})
        return {"resourceType": "Parameters", "parameter": out}

    @staticmethod
    def _default_properties(cs: CodeSystemIndex, con: Concept) -> tuple[str, ...]:
        codes = ["parent", "child", "inactive"]
        for p in con.properties:
            c = p.get("code")
            if isinstance(c, str) and c not in codes and c not in cs._parent_props and c not in cs._child_props:
                codes.append(c)
        return tuple(codes)

    def subsumes(self, system: str, code_a: str, code_b: str, version: str | None = None) -> str:
        sys = self.canonical_system(system)
        cs = self.code_system(sys, version)
        if cs is None or cs.content == "not-present":
            raise FHIRError(404, f"Code system {sys} is not known here", "not-found", expression="system",
                            message_id="cs-unknown")
        a, b = cs.get(code_a), cs.get(code_b)
        for name, code, con in (("codeA", code_a, a), ("codeB", code_b, b)):
            if con is None:
                raise FHIRError(404, f"Code '{code}' ({name}) is not in code system {cs.canonical}", "not-found",
                                expression=name, message_id="code-unknown")
        assert a is not None and b is not None
        return cs.subsumes(a.code, b.code)

    # ------------------------------------------------------------------ translate

    def concept_map(self, url: str, version: str | None = None) -> dict[str, Any] | None:
        return self._usable(self.registry.resolve(url + ("|" + version if version else ""), "ConceptMap"))

    def _maps_for(self, system: str) -> list[str]:
        if self._maps_by_system is None:
            m: dict[str, list[str]] = {}
            seen: set[str] = set()
            for meta in self.registry.iter_meta("ConceptMap"):
                url = meta.get("url")
                if not url or url in seen:
                    continue
                seen.add(url)
                cm = self._usable(self.registry.resolve(url, "ConceptMap"))
                if cm is None:
                    continue
                src, tgt = map_systems(cm)
                for s in src | tgt:
                    m.setdefault(s, []).append(url)
            self._maps_by_system = m
        return self._maps_by_system.get(system, [])

    def translate(self, system: str, code: str, *, maps: list[dict[str, Any]] | None = None,
                  reverse: bool = False, target_system: str | None = None, source_scope: str | None = None,
                  target_scope: str | None = None, dependencies: list[tuple[str, str]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        """``$translate`` output: matches for ``system#code`` across the given maps (or every map that fits)."""
        sys = self.canonical_system(system)
        if maps is None:
            maps = []
            for url in self._maps_for(sys):
                cm = self._usable(self.registry.resolve(url, "ConceptMap"))
                if cm is None:
                    continue
                if source_scope and scope_of(cm, "sourceScope") not in (source_scope, None):
                    continue
                if target_scope and scope_of(cm, "targetScope") not in (target_scope, None):
                    continue
                maps.append(cm)
        matches: list[Match] = []
        for cm in maps:
            matches.extend(translate(cm, sys, code, reverse=reverse, target_system=target_system,
                                     dependencies=dependencies, resolve_map=lambda u: self.concept_map(*_split(u))))
        found = any(m.relationship != "not-related-to" for m in matches)
        params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": found}]
        if not found:
            where = f"{len(maps)} concept map(s)" if maps else "no concept map for that system"
            params.append({"name": "message", "valueString":
                           f"No {'reverse ' if reverse else ''}mapping found for {sys}#{code} ({where})"})
        params.extend(m.to_parameter() for m in matches)
        return {"resourceType": "Parameters", "parameter": params}

    # ------------------------------------------------------------------ TerminologyCapabilities

    def capabilities(self, base_url: str = "", software_version: str = "") -> dict[str, Any]:
        """A TerminologyCapabilities resource (for ``GET /metadata?mode=terminology``): the code systems
        loaded here, and what $expand, $validate-code and $translate support."""
        systems: dict[str, list[str]] = {}
        contents: dict[str, str] = {}
        for meta in self.registry.iter_meta("CodeSystem"):
            url, content = meta.get("url"), meta.get("content")
            if not url or content in ("supplement", "not-present"):
                continue
            versions = systems.setdefault(url, [])
            if meta.get("version") and meta["version"] not in versions:
                versions.append(meta["version"])
            contents.setdefault(url, content or "complete")
        code_systems: list[dict[str, Any]] = []
        for url in sorted(systems):
            entry: dict[str, Any] = {"uri": url}
            if systems[url]:
                entry["version"] = [{"code": v} for v in systems[url]]
            entry["content"] = contents[url]
            code_systems.append(entry)
        code_systems.append({"uri": ucum.UCUM, "content": "not-present"})
        out: dict[str, Any] = {
            "resourceType": "TerminologyCapabilities",
            "status": "active",
            "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "kind": "instance",
            "software": {"name": "DHP", **({"version": software_version} if software_version else {})},
            "codeSystem": code_systems,
            "expansion": {
                "hierarchical": True, "paging": True, "incomplete": False,
                "parameter": [{"name": n} for n in (
                    "url", "valueSet", "valueSetVersion", "filter", "count", "offset", "displayLanguage",
                    "includeDesignations", "designation", "includeDefinition", "activeOnly", "excludeNested",
                    "excludeNotForUI", "property", "exclude-system", "system-version", "check-system-version",
                    "force-system-version", "date")],
                "textFilter": "Case-insensitive; every word must start a word of a designation in any language "
                              "or of the code; Uzbek apostrophe variants (oʻ/o'/gʻ/g') are treated alike.",
            },
            "codeSearch": "in-compose-or-expansion",
            "validateCode": {"translations": False},
            "translation": {"needsMap": False},
            "closure": {"translation": False},
        }
        if base_url:
            out["implementation"] = {"description": "DHP terminology service", "url": base_url}
        return out

    # ------------------------------------------------------------------ checks on definitions written via the API

    def check_definition(self, resource: dict[str, Any]) -> list[Issue]:
        """Terminology-specific problems in a CodeSystem, ValueSet, ConceptMap or NamingSystem about to be
        stored. Errors should reject the write (422); warnings can be returned to the client."""
        rt = resource.get("resourceType")
        bad = shape_problem(resource)
        if bad is not None:
            # Stored definitions are read by the engine assuming FHIR JSON types; a wrong type would be a 500
            # on every later use (and in validation of resources bound to it), so it is refused now.
            return [Issue("error", "structure", f"{bad}", [bad.where], "tx-structure")]
        if rt == "CodeSystem":
            return self._check_codesystem(resource)
        if rt == "ValueSet":
            return self._check_valueset(resource)
        if rt == "ConceptMap":
            return self._check_conceptmap(resource)
        if rt == "NamingSystem":
            return self._check_namingsystem(resource)
        return []

    def _check_codesystem(self, cs: dict[str, Any]) -> list[Issue]:
        issues: list[Issue] = []
        content = cs.get("content")
        if content not in ("not-present", "example", "fragment", "complete", "supplement"):
            issues.append(Issue("error", "invalid", f"CodeSystem.content {content!r} is not a valid code",
                                ["CodeSystem.content"], "cs-content"))
        seen: set[str] = set()
        defined = {p.get("code") for p in cs.get("property") or [] if isinstance(p, dict)}
        defined |= {"parent", "child", "status", "inactive", "notSelectable", "deprecated", "deprecationDate",
                    "retirementDate", "synonym", "comment", "itemWeight", "order"}
        flat = list(_flatten_with_path(cs.get("concept") or [], "CodeSystem.concept"))
        for where, c in flat:
            code = c.get("code")
            if not isinstance(code, str) or not code.strip():
                issues.append(Issue("error", "required", "Every concept needs a code", [where], "cs-code-missing"))
                continue
            if code in seen:
                issues.append(Issue("error", "duplicate", f"Code '{code}' is defined twice", [where],
                                    "cs-code-duplicate"))
            seen.add(code)
            for j, p in enumerate(c.get("property") or []):
                if isinstance(p, dict) and p.get("code") not in defined:
                    issues.append(Issue("warning", "invalid", f"Concept '{code}' uses property "
                                        f"'{p.get('code')}' that the CodeSystem does not define",
                                        [f"{where}.property[{j}]"], "cs-property-undefined"))
        if content == "supplement":
            target = cs.get("supplements")
            if not isinstance(target, str) or not target:
                issues.append(Issue("error", "required", "A supplement must say which code system it supplements",
                                    ["CodeSystem.supplements"], "cs-supplements-missing"))
            elif _split(target)[0] == cs.get("url") or self._is_supplement(target):
                issues.append(Issue("error", "invalid", f"A supplement cannot supplement {target}: it is "
                                    "itself a supplement", ["CodeSystem.supplements"], "cs-supplements-supplement"))
            else:
                for where, c in flat:
                    for j, p in enumerate(c.get("property") or []):
                        if isinstance(p, dict) and p.get("code") in ("parent", "child"):
                            # The hierarchy is the code system's own; a supplement changing it could make a
                            # cycle in a system it does not own.
                            issues.append(Issue("error", "invalid", "A supplement cannot change the hierarchy "
                                                f"(concept '{c.get('code')}' has property {p['code']})",
                                                [f"{where}.property[{j}]"], "cs-supplement-hierarchy"))
                base = self.code_system(*_split(target))
                if base is None:
                    issues.append(Issue("warning", "not-found", f"Supplemented code system {target} is not "
                                        "loaded here; its translations will show only where it is enumerated",
                                        ["CodeSystem.supplements"], "cs-supplements-unknown"))
                else:
                    for where, c in flat:
                        if isinstance(c.get("code"), str) and base.get(c["code"]) is None and base.complete:
                            issues.append(Issue("error", "code-invalid", f"Code '{c['code']}' is not in the "
                                                f"supplemented code system {base.canonical}", [where],
                                                "cs-supplement-code-unknown"))
        elif content == "complete" and cs.get("count") is not None and cs.get("count") != len(seen):
            issues.append(Issue("warning", "invalid", f"CodeSystem.count is {cs.get('count')} but {len(seen)} "
                                "concepts are defined", ["CodeSystem.count"], "cs-count"))
        if content != "supplement":
            cycle = _hierarchy_cycle(cs, flat)
            if cycle:
                issues.append(Issue("error", "invalid", "The concept hierarchy has a cycle: " + " → ".join(cycle),
                                    ["CodeSystem.concept"], "cs-hierarchy-cycle"))
            for where, c in flat:
                for j, p in enumerate(c.get("property") or []):
                    if isinstance(p, dict) and p.get("code") in ("parent", "child"):
                        v = p.get("valueCode")
                        if isinstance(v, str) and v not in seen:
                            issues.append(Issue("error", "invalid", f"Concept '{c.get('code')}' names "
                                                f"{p['code']} '{v}', which is not in this code system",
                                                [f"{where}.property[{j}]"], "cs-hierarchy-unknown"))
        return issues

    def _includes(self, ref: str, url: str) -> list[str] | None:
        """The chain of ``valueSet`` includes by which ``ref`` reaches ``url`` (a loop, if ``url`` is the value
        set being written), or None. Follows stored value sets only, each at most once."""

        def refs(cur: str) -> Iterator[Any]:
            vs = self.value_set(*_split(cur))
            compose = vs.get("compose") if isinstance(vs, dict) else None
            if isinstance(compose, dict):
                for kind in ("include", "exclude"):
                    for inc in compose.get(kind) or []:
                        got = inc.get("valueSet") if isinstance(inc, dict) else None
                        yield from got if isinstance(got, list) else ()

        return _chain_to(ref, url, refs)

    def _other_map_loop(self, ref: str, url: str) -> list[str] | None:
        """The otherMap chain by which ``ref`` leads back to the map ``url``, or None (stored maps, each once)."""

        def refs(cur: str) -> Iterator[Any]:
            cm = self.concept_map(*_split(cur))
            for g in cm.get("group") or [] if isinstance(cm, dict) else ():
                um = g.get("unmapped") if isinstance(g, dict) else None
                if isinstance(um, dict) and um.get("mode") == "other-map":
                    yield um.get("otherMap")

        return _chain_to(ref, url, refs)

    def _is_supplement(self, canonical: str) -> bool:
        res = self.registry.resolve(canonical, "CodeSystem")
        return res is not None and res.get("content") == "supplement"

    def _check_valueset(self, vs: dict[str, Any]) -> list[Issue]:
        issues: list[Issue] = []
        compose = vs.get("compose")
        if compose is None:
            return issues
        for kind in ("include", "exclude"):
            for i, inc in enumerate(compose.get(kind) or []):
                where = f"ValueSet.compose.{kind}[{i}]"
                if not isinstance(inc, dict):
                    continue
                if not inc.get("system") and not inc.get("valueSet"):
                    issues.append(Issue("error", "required", "An include/exclude needs a system or a valueSet",
                                        [where], "vs-include-empty"))
                if inc.get("concept") and inc.get("filter"):
                    issues.append(Issue("error", "invalid", "An include/exclude cannot have both concepts and "
                                        "filters", [where], "vs-concept-and-filter"))
                for j, f in enumerate(inc.get("filter") or []):
                    if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in ("property", "op",
                                                                                            "value")):
                        issues.append(Issue("error", "required", "A filter needs property, op and value",
                                            [f"{where}.filter[{j}]"], "vs-filter-invalid"))
                    elif f["op"] not in FILTER_OPS:
                        issues.append(Issue("error", "code-invalid", f"Filter operator {f['op']!r} is not "
                                            "supported", [f"{where}.filter[{j}].op"], "vs-filter-op"))
                for j, ref in enumerate(inc.get("valueSet") or []):
                    loop = self._includes(ref, vs.get("url")) if vs.get("url") else None
                    if loop is not None:
                        issues.append(Issue("error", "invalid", "A value set cannot include itself"
                                            + (f" (via {' → '.join(loop)})" if len(loop) > 1 else ""),
                                            [f"{where}.valueSet[{j}]"], "vs-circular"))
                    elif self.value_set(*_split(ref)) is None:
                        issues.append(Issue("warning", "not-found", f"ValueSet {ref} is not known here",
                                            [f"{where}.valueSet[{j}]"], "vs-unknown"))
                system = inc.get("system")
                if isinstance(system, str):
                    cs = self.code_system(self.canonical_system(system), inc.get("version"))
                    if cs is None:
                        if system != ucum.UCUM:
                            issues.append(Issue("warning", "not-found", f"Code system {system} is not loaded "
                                                "here; codes from it are not checked", [f"{where}.system"],
                                                "unknown-system"))
                    else:
                        for j, f in enumerate(inc.get("filter") or []):
                            prop = f.get("property") if isinstance(f, dict) else None
                            if isinstance(prop, str) and not cs.knows_property(prop):
                                # Such a filter silently matches nothing (or everything, for not-in).
                                issues.append(Issue("error", "not-found", f"Filter property {prop!r} is not "
                                                    f"defined by code system {cs.canonical}",
                                                    [f"{where}.filter[{j}].property"], "vs-filter-property"))
                    if cs is not None and cs.complete:
                        for j, c in enumerate(inc.get("concept") or []):
                            if isinstance(c, dict) and isinstance(c.get("code"), str) and cs.get(c["code"]) is None:
                                issues.append(Issue("error", "code-invalid", f"Code '{c['code']}' is not in "
                                                    f"code system {cs.canonical}", [f"{where}.concept[{j}]"],
                                                    "code-unknown"))
        return issues

    def _check_conceptmap(self, cm: dict[str, Any]) -> list[Issue]:
        issues: list[Issue] = []
        for gi, g in enumerate(cm.get("group") or []):
            if not isinstance(g, dict):
                continue
            for ei, el in enumerate(g.get("element") or []):
                where = f"ConceptMap.group[{gi}].element[{ei}]"
                if not isinstance(el, dict):
                    continue
                if not el.get("code") and not el.get("valueSet"):
                    issues.append(Issue("error", "required", "An element needs a code (or valueSet)", [where],
                                        "cm-element-code"))
                if el.get("noMap") is True and el.get("target"):
                    issues.append(Issue("error", "invalid", "An element with noMap=true cannot have targets",
                                        [where], "cm-nomap-target"))
                for ti, t in enumerate(el.get("target") or []):
                    rel = t.get("relationship") if isinstance(t, dict) else None
                    if rel not in RELATIONSHIPS:
                        issues.append(Issue("error", "code-invalid", f"target.relationship {rel!r} is not one of "
                                            f"{', '.join(sorted(RELATIONSHIPS))}",
                                            [f"{where}.target[{ti}].relationship"], "cm-relationship"))
            um = g.get("unmapped")
            if isinstance(um, dict):
                mode = um.get("mode")
                if mode not in ("use-source-code", "fixed", "other-map"):
                    issues.append(Issue("error", "code-invalid", f"unmapped.mode {mode!r} is not valid",
                                        [f"ConceptMap.group[{gi}].unmapped.mode"], "cm-unmapped-mode"))
                elif mode == "fixed" and not um.get("code") and not um.get("valueSet"):
                    issues.append(Issue("error", "required", "unmapped mode 'fixed' needs a code",
                                        [f"ConceptMap.group[{gi}].unmapped"], "cm-unmapped-fixed"))
                elif mode == "other-map" and not um.get("otherMap"):
                    issues.append(Issue("error", "required", "unmapped mode 'other-map' needs otherMap",
                                        [f"ConceptMap.group[{gi}].unmapped"], "cm-unmapped-othermap"))
                elif mode == "other-map" and isinstance(cm.get("url"), str):
                    loop = self._other_map_loop(um["otherMap"], cm["url"])
                    if loop is not None:
                        issues.append(Issue("error", "invalid", "unmapped.otherMap leads back to this map: "
                                            + " → ".join(loop), [f"ConceptMap.group[{gi}].unmapped.otherMap"],
                                            "cm-othermap-circular"))
        return issues

    @staticmethod
    def _check_namingsystem(ns: dict[str, Any]) -> list[Issue]:
        issues: list[Issue] = []
        ids = ns.get("uniqueId") or []
        if not ids:
            issues.append(Issue("error", "required", "A NamingSystem needs at least one uniqueId",
                                ["NamingSystem.uniqueId"], "ns-uniqueid"))
        preferred: dict[str, int] = {}
        for i, u in enumerate(ids):
            if not isinstance(u, dict) or not u.get("value") or not u.get("type"):
                issues.append(Issue("error", "required", "uniqueId needs a type and a value",
                                    [f"NamingSystem.uniqueId[{i}]"], "ns-uniqueid"))
                continue
            if u.get("preferred") is True:
                preferred[u["type"]] = preferred.get(u["type"], 0) + 1
        for t, n in preferred.items():
            if n > 1:
                issues.append(Issue("error", "invalid", f"More than one preferred uniqueId of type {t}",
                                    ["NamingSystem.uniqueId"], "ns-preferred"))
        return issues


def _split(canonical: str) -> tuple[str, str | None]:
    url, _, version = canonical.partition("|")
    return url, version or None


def _parameters(items: list[tuple[str, str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": n, k: v} for n, k, v in items]}


def _flatten_with_path(concepts: list[Any], path: str) -> Any:
    for i, c in enumerate(concepts):
        if isinstance(c, dict):
            yield f"{path}[{i}]", c
            yield from _flatten_with_path(c.get("concept") or [], f"{path}[{i}].concept")


def _chain_to(ref: str, url: str, refs: Callable[[str], Iterator[Any]]) -> list[str] | None:
    """The chain of canonical references (``refs`` of each stored resource) from ``ref`` to ``url``, as urls
    starting with ``url``, or None. Each resource is followed once."""
    prev: dict[str, str | None] = {_split(ref)[0]: None}
    todo = [ref]
    while todo:
        cur = todo.pop()
        cur_url = _split(cur)[0]
        if cur_url == url:
            chain = [cur_url]
            while (p := prev.get(chain[-1])) is not None:
                chain.append(p)
            return [url, *reversed(chain)]
        for r in refs(cur):
            if isinstance(r, str) and _split(r)[0] not in prev:
                prev[_split(r)[0]] = cur_url
                todo.append(r)
    return None


def _hierarchy_cycle(cs: dict[str, Any], flat: list[tuple[str, dict[str, Any]]]) -> list[str] | None:
    """A cycle in a CodeSystem's hierarchy (nested concepts plus parent/child properties), as codes, or None.

    A cycle makes a code its own ancestor: subsumption answers both ways and hierarchical expansions lose codes."""
    defs = [p for p in cs.get("property") or [] if isinstance(p, dict)]
    parent_codes = {"parent"} | {p.get("code") for p in defs if p.get("uri") == CONCEPT_PROPERTIES + "parent"}
    child_codes = {"child"} | {p.get("code") for p in defs if p.get("uri") == CONCEPT_PROPERTIES + "child"}
    parents: dict[str, set[str]] = {}

    def walk(concepts: list[Any], parent: str | None) -> None:
        stack = [(concepts, parent)]
        while stack:
            items, up = stack.pop()
            for c in items:
                if not isinstance(c, dict) or not isinstance(c.get("code"), str):
                    continue
                if up is not None:
                    parents.setdefault(c["code"], set()).add(up)
                if isinstance(c.get("concept"), list):
                    stack.append((c["concept"], c["code"]))

    walk(cs.get("concept") or [], None)
    for _, c in flat:
        code = c.get("code")
        if not isinstance(code, str):
            continue
        for p in c.get("property") or []:
            if not isinstance(p, dict):
                continue
            v = next((x for k, x in p.items() if k.startswith("value")), None)
            target = v.get("code") if isinstance(v, dict) else v
            if not isinstance(target, str) or target == code:
                continue
            if p.get("code") in parent_codes:
                parents.setdefault(code, set()).add(target)
            elif p.get("code") in child_codes:
                parents.setdefault(target, set()).add(code)
    # Iterative depth-first search (a 100,000-code chain must not hit the recursion limit).
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in parents:
        if start in state:
            continue
        path: list[str] = [start]
        iters = [iter(parents.get(start, ()))]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            st = state.get(nxt)
            if st == 1:
                return [*path[path.index(nxt):], nxt]
            if st is None:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(parents.get(nxt, ())))
    return None
