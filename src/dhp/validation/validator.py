"""The validator: structure against the base R5 definitions, then every applicable profile, as compiled plans.

One pass per plan over the parsed JSON. Plans are compiled once per profile ``url|version`` and dropped when
the registry's API overlay changes. Hot invariants (ele-1, ext-1, dom-*, bdl-*, ref-*, …) run natively; the
rest go through fhirpathpy, compiled once per expression.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from dhp import fhirpathsyntax, regexguard
from dhp.errors import Issue
from dhp.regexguard import RiskyRegex, regex_risk
from dhp.terminology.types import CodeCheck, CodeValidator
from dhp.validation import fastpath, fhirpath
from dhp.validation.plan import BASE, Constraint, Elem, Plan, build_plan
from dhp.validation.primitives import PRIMITIVES, check_primitive
from dhp.validation.xhtml import check_xhtml

log = logging.getLogger("dhp.validation")

DAR_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
CAPABILITY_ID = "DHPCapabilityStatement"
_CODED = frozenset({"code", "Coding", "CodeableConcept", "Quantity", "CodeableReference", "string", "uri"})
_ABSTRACT_CONTAINERS = frozenset({"Resource", "DomainResource"})
# Deepest nesting of complex values walked. Real resources stay far below (QuestionnaireResponse items are the
# deepest); hostile ones (an extension inside an extension 500 times) would otherwise exhaust the stack.
MAX_DEPTH = 100
_REF_RE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_TOKEN_RE = re.compile(r"\$this|resolve\(\)|extension\('([^']*)'\)|extension\(\"([^\"]*)\"\)|ofType\(([^)]*)\)"
                       r"|as\(([^)]*)\)|[A-Za-z0-9_\[\]]+")


#: FHIRPath steps (fastpath loop items, fhirpathpy nodes) one invariant evaluation, and all the invariants of
#: one validation, may take: an expression from a profile written through the API can be exponential, and
#: validation runs on the server's event loop. Far above what real invariants need on large resources.
INVARIANT_STEPS = 1_000_000
RUN_STEPS = 20_000_000


class _Run:
    """State of one top-level validate() call."""

    __slots__ = ("bundles", "conform_cache", "contained_flags", "containers", "depth", "env", "full_urls", "issues",
                 "n_add", "nested_done", "profile", "seen", "silent", "steps_left", "unchecked")

    def __init__(self, silent: bool = False) -> None:
        self.issues: list[Issue] = []
        self.seen: set[tuple[Any, ...]] = set()
        self.containers: list[dict[str, Any]] = []  # resource stack (for %resource, contained, '#id')
        self.contained_flags: list[bool] = []  # parallel to containers: is that resource a contained one?
        self.bundles: list[dict[str, dict[str, Any]]] = []  # fullUrl / Type/id → resource, innermost last
        self.full_urls: dict[int, str] = {}  # id(resource) → its entry's fullUrl
        self.conform_cache: dict[tuple[int, str], bool] = {}
        self.profile = ""
        self.silent = silent
        self.unchecked = 0
        self.n_add = 0  # add() calls, duplicates included: "did this check report anything?"
        self.env: Any = None
        self.depth = 0  # nesting of complex values being walked (bounded: MAX_DEPTH)
        # (id(resource), plan key, profile, path) of nested resources already walked: a resource reached again
        # through the same path under the same top profile gives the same issues, so one walk is enough.
        # Without this, contained-in-contained resources with a meta.profile are walked 2^depth times.
        self.nested_done: set[tuple[Any, ...]] = set()
        self.steps_left = RUN_STEPS  # FHIRPath evaluation steps left for the invariants of this run

    def add(self, severity: str, code: str, message_id: str, diagnostics: str, path: str) -> None:
        self.n_add += 1
        key = (severity, message_id, path, diagnostics)
        if key in self.seen:
            return
        self.seen.add(key)
        self.issues.append(Issue(severity, code, diagnostics, [path] if path else [], message_id))

    @property
    def errors(self) -> int:
        return sum(1 for i in self.issues if i.severity in ("error", "fatal"))


class _WithPending:
    """The registry as it will be once ``sd`` is stored: a cycle through ``sd`` shows up before it is."""

    def __init__(self, registry: Any, sd: dict[str, Any]) -> None:
        self.registry = registry
        self.sd = sd

    def structure_definition(self, name_or_url: str) -> dict[str, Any] | None:
        url = name_or_url if "/" in name_or_url else BASE + name_or_url
        if url.partition("|")[0] == self.sd.get("url"):
            return self.sd
        found: dict[str, Any] | None = self.registry.structure_definition(name_or_url)
        return found


class Validator:
    """Validates parsed FHIR JSON against base definitions and profiles; returns :class:`Issue` lists."""

    def __init__(self, registry: Any, terminology: CodeValidator | None = None, *,
                 require_meta_profile: bool = False,
                 default_profiles: dict[str, list[str]] | None = None) -> None:
        self.registry = registry
        self.terminology = terminology
        self.require_meta_profile = require_meta_profile
        self._explicit_defaults = default_profiles
        self._defaults: dict[str, list[str]] | None = None
        self._plans: dict[str, Plan | None] = {}
        self._plan_errors: dict[str, str] = {}  # canonical → why its StructureDefinition cannot be used
        self._codes: dict[tuple[str | None, str, str | None], CodeCheck] = {}
        self._matchers: dict[int, list[Callable[..., bool]]] = {}
        self._slice_tables: dict[int, dict[Any, int] | None] = {}
        # (extension url|version, instance path, element, host) → context allowed; depends only on the plan.
        self._contexts: dict[tuple[Any, ...], bool] = {}
        # (element, string value) pairs of Elem.memo1 elements that passed every check of _primitive.
        self._prim_ok: set[tuple[Elem, str]] = set()
        self._resource_types: frozenset[str] = registry.resource_types()
        registry.listeners.append(self.clear)

    # ------------------------------------------------------------------ plans

    def clear(self) -> None:
        """Drop compiled plans and caches (the registry's API overlay changed)."""
        self._plans = {}
        self._plan_errors = {}
        self._codes = {}
        self._matchers = {}
        self._slice_tables = {}
        self._contexts = {}
        self._prim_ok = set()
        self._defaults = None

    def plan(self, canonical: str) -> Plan | None:
        """The compiled plan of a StructureDefinition (``url``, ``url|version`` or a type name)."""
        hit = self._plans.get(canonical, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        sd = self.registry.structure_definition(canonical)
        plan: Plan | None = None
        if sd is not None:
            try:
                plan = build_plan(sd, self.registry)
                from_api = getattr(self.registry, "from_api", None)
                if from_api is None or not from_api(sd):
                    for el in plan.by_id.values():
                        for c in el.constraints:
                            c.trusted = True
            except Exception as e:  # a broken profile must not break validation of everything else
                log.warning("cannot use StructureDefinition %s: %s", canonical, e)
                self._plan_errors[canonical] = str(e) or type(e).__name__
        self._plans[canonical] = plan
        return plan

    def plan_error(self, canonical: str) -> str | None:
        """Why :meth:`plan` gave None for a StructureDefinition that exists (None: it does not exist)."""
        return self._plan_errors.get(canonical)

    def check_definition(self, sd: dict[str, Any]) -> list[Issue]:
        """Can this StructureDefinition, about to be stored, be used to validate? Errors for what is wrong
        with it on its own: a snapshot that cannot be generated or compiled (a cycle of baseDefinitions,
        elements not in the base, wrong JSON types, too many elements) and invariants that do not parse. A
        base that is not known yet is not an error (it may be created next); validation reports it then."""
        from dhp.validation.snapshot import UnknownBase

        run = _Run()
        snap = sd.get("snapshot")
        if not (isinstance(snap, dict) and snap.get("element")) and sd.get("derivation") != "constraint":
            return []  # a new type (logical model, …) without snapshot: nothing here generates one
        try:
            plan = build_plan(sd, _WithPending(self.registry, sd))
        except UnknownBase:
            return []
        except Exception as e:  # whatever stops it here would stop validation against it
            run.add("error", "invalid", "profile-unusable",
                    f"StructureDefinition {sd.get('url')} cannot be used for validation: {e}", "StructureDefinition")
            return run.issues
        diff = sd.get("differential")
        own = {c.get("key") for de in _arr(diff.get("element") if isinstance(diff, dict) else None)
               if isinstance(de, dict)
               for c in _arr(de.get("constraint")) if isinstance(c, dict)}
        seen: set[str] = set()
        for el in plan.by_id.values():
            for c in el.constraints:
                if c.key in NATIVE or not c.expression or c.expression in seen or (
                        c.key not in own and c.source and c.source != plan.url):
                    continue
                seen.add(c.expression)
                why = fhirpathsyntax.syntax_error(c.expression)
                if why is not None:
                    run.add("error", "invalid", "invariant-syntax",
                            f"{el.id}: constraint {c.key}: the FHIRPath expression does not parse ({why}): "
                            f"{c.expression}", "StructureDefinition")
                    continue
                for pattern in _literal_regexes(c.expression):
                    why = regex_risk(pattern)
                    if why is not None:
                        run.add("error", "too-costly", "invariant-regex-refused",
                                f"{el.id}: constraint {c.key}: regex {pattern!r} {why}: {c.expression}",
                                "StructureDefinition")
        return run.issues

    def type_plan(self, code: str) -> Plan | None:
        return self.plan(BASE + code) if "/" not in code else self.plan(code)

    def keymap(self, elem: Elem | None, tcode: str) -> dict[str, tuple[Elem, str | None]]:
        """JSON property name → (element, type code) for a value of type ``tcode`` held by ``elem``; with no
        ``elem``, for a resource of type ``tcode``. Empty when the type is not known."""
        if elem is None:
            plan = self.type_plan(tcode)
            if plan is None:
                return {}
            elem = plan.root
        return self._effective(elem, tcode)[0]

    def default_profiles(self) -> dict[str, list[str]]:
        if self._explicit_defaults is not None:
            return self._explicit_defaults
        if self._defaults is None:
            out: dict[str, list[str]] = {}
            cs = None
            for c in self.registry.all("CapabilityStatement"):
                if c.get("id") == CAPABILITY_ID:
                    cs = c
                    break
            for rest in (cs or {}).get("rest") or ():
                for r in rest.get("resource") or ():
                    profs = list(r.get("supportedProfile") or ())
                    if r.get("type") and profs:
                        out[r["type"]] = profs[:1]
            self._defaults = out
        return self._defaults

    # ------------------------------------------------------------------ entry point

    def validate(self, resource: Any, profiles: list[str] | None = None, *, source: bytes | None = None,
                 mode: str | None = None) -> list[Issue]:
        run = _Run()
        try:
            self._validate_top(run, resource, profiles, mode)
        except RecursionError:
            # Last line of defence (MAX_DEPTH should prevent it): a verdict, never a 500.
            run.add("fatal", "too-costly", "nesting-too-deep",
                    "the resource is nested too deeply to be validated", "")
        if run.unchecked:
            run.add("information", "informational", "binding-not-checked",
                    f"{run.unchecked} coded value(s) not checked against their value sets: "
                    "no terminology service is configured", "")
        issues = run.issues
        if source is not None and issues:
            from dhp.validation.locate import add_positions

            add_positions(issues, resource, source)
        order = {"fatal": 0, "error": 1, "warning": 2, "information": 3}
        issues.sort(key=lambda i: order.get(i.severity, 4))
        return issues

    def _validate_top(self, run: _Run, resource: Any, profiles: list[str] | None, mode: str | None) -> None:
        if not isinstance(resource, dict):
            run.add("fatal", "structure", "not-a-resource", "a resource must be a JSON object", "")
            return
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype not in self._resource_types:
            run.add("fatal", "structure", "resource-type",
                    f"unknown or missing resourceType: {rtype!r}", "")
            return
        if mode == "update" and not resource.get("id"):
            run.add("error", "required", "id-required", "mode 'update' needs a resource with an id", rtype)
        if mode == "create" and resource.get("id") is not None and not isinstance(resource.get("id"), str):
            run.add("error", "structure", "json-type", "id must be a string", f"{rtype}.id")
        meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
        declared = [p for p in (meta.get("profile") or []) if isinstance(p, str)] if isinstance(
            meta.get("profile"), list) else []
        plans: list[Plan] = []
        if profiles is None:
            if self.require_meta_profile and not declared:
                run.add("error", "required", "meta-profile-missing",
                        "meta.profile is required: every resource must declare the profile it conforms to "
                        "(DHP_REQUIRE_META_PROFILE)", f"{rtype}.meta")
            wanted = list(declared)
            for p in self.default_profiles().get(rtype, ()):
                if p not in wanted:
                    wanted.append(p)
        else:
            wanted = list(profiles)
        for i, url in enumerate(wanted):
            p = self.plan(url)
            # The index in meta.profile as sent (non-string entries included), not in the filtered list.
            where = f"{rtype}.meta.profile[{meta['profile'].index(url)}]" if url in declared else rtype
            if p is None and self.plan_error(url):
                run.add("error", "invalid", "profile-unusable",
                        f"profile {url} cannot be used for validation: {self.plan_error(url)}", where)
                continue
            if p is None:
                run.add("error", "not-found", "profile-unknown",
                        f"profile {url} is not known to this server (load its package or create the "
                        "StructureDefinition first)", where)
                continue
            if p.type != rtype:
                run.add("error", "invalid", "profile-type",
                        f"profile {url} is for {p.type}, not {rtype}", where)
                continue
            if i and any(q.key == p.key for q in plans):
                continue
            plans.append(p)
        if not plans:
            base = self.type_plan(rtype)
            if base is None:
                run.add("fatal", "not-supported", "resource-type", f"no definition for {rtype}", rtype)
                return
            plans.append(base)
        for p in plans:
            run.profile = p.url
            self._resource(run, resource, p, rtype)

    # ------------------------------------------------------------------ resources

    def _resource(self, run: _Run, res: dict[str, Any], plan: Plan, path: str, contained: bool = False) -> None:
        run.containers.append(res)
        run.contained_flags.append(contained)
        bundle_pushed = False
        try:
            if res.get("resourceType") == "Bundle" and isinstance(res.get("entry"), list):
                run.bundles.append(self._bundle_index(run, res))
                bundle_pushed = True
            self._complex(run, res, plan.root, plan.type, path, plan.type, resource=True)
        finally:
            run.containers.pop()
            run.contained_flags.pop()
            if bundle_pushed:
                run.bundles.pop()

    def _bundle_index(self, run: _Run, bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """fullUrl → resource and Type/id → resource, built once per Bundle (linear in entries)."""
        idx: dict[str, dict[str, Any]] = {}
        for e in bundle.get("entry") or ():
            if not isinstance(e, dict):
                continue
            r = e.get("resource")
            if not isinstance(r, dict):
                continue
            fu = e.get("fullUrl")
            if isinstance(fu, str):
                idx.setdefault(fu, r)
                run.full_urls[id(r)] = fu
            rt, rid = r.get("resourceType"), r.get("id")
            if isinstance(rt, str) and isinstance(rid, str):
                idx.setdefault(f"{rt}/{rid}", r)
        return idx

    def resolve_reference(self, run: _Run, ref: str) -> dict[str, Any] | None:
        """Find the target of a reference inside the resource (contained) or the enclosing Bundles."""
        if ref.startswith("#"):
            container = self._container_root(run)
            if container is None:
                return None
            if ref == "#":
                return container
            for c in _arr(container.get("contained")):
                if isinstance(c, dict) and c.get("id") == ref[1:]:
                    return c
            return None
        for idx in reversed(run.bundles):
            hit = idx.get(ref)
            if hit is not None:
                return hit
            if "://" not in ref and not ref.startswith("urn:"):
                # Relative reference: against the current entry's fullUrl base, then by Type/id.
                cur = run.containers[-1] if run.containers else None
                fu = run.full_urls.get(id(cur)) if cur is not None else None
                if fu and "/" in fu:
                    m = _REF_RE.search(fu)
                    if m:
                        # fullUrl https://host/fhir/Patient/1 → base https://host/fhir
                        hit = idx.get(f"{fu[: m.start()]}/{ref}")
                        if hit is not None:
                            return hit
                m = _REF_RE.search(ref)
                if m:
                    hit = idx.get(f"{m.group(1)}/{m.group(2)}")
                    if hit is not None:
                        return hit
        return None

    def _container_root(self, run: _Run) -> dict[str, Any] | None:
        """The resource that holds ``contained`` for the current position (skips contained resources)."""
        flags = run.contained_flags
        if flags and not flags[-1]:
            return run.containers[-1]  # the usual case: not inside a contained resource
        for r, contained in zip(reversed(run.containers), reversed(run.contained_flags), strict=True):
            if not contained:
                return r
        return run.containers[0] if run.containers else None

    # ------------------------------------------------------------------ effective element checks

    def _effective(self, elem: Elem, tcode: str) -> tuple[dict[str, tuple[Elem, str | None]], list[Elem],
                                                          list[Constraint], str]:
        """(keymap, required children, constraints, fhirpath type path) for values of ``tcode`` at ``elem``."""
        eff = elem._eff.get(tcode)
        if eff is not None:
            return eff
        holder: Elem | None = None
        if elem.sub:
            holder = elem
        elif elem.content_ref:
            holder = self._content_target(elem)
        if holder is None:
            tp = self.type_plan(tcode) if tcode else None
            holder = tp.root if tp is not None else None
        km = holder.keymap if holder is not None and holder.keymap is not None else (
            holder.build_keymap() if holder is not None else {})
        required: list[Elem] = []
        if holder is not None:
            for c in holder.sub.values():
                if c.min > 0 or any(s.min > 0 for s in c.slices):
                    required.append(c)
        constraints = list(elem.constraints)
        if tcode and tcode not in PRIMITIVES and tcode not in ("BackboneElement", "Element"):
            tp = self.type_plan(tcode)
            if tp is not None and tp.root is not elem:
                keys = {c.key for c in constraints}
                constraints += [c for c in tp.root.constraints if c.key not in keys]
        # ele-1 is enforced by the empty-value checks, narrative by the XHTML check, ref-1 by reference
        # resolution: no need to run them again per element.
        constraints = [c for c in constraints if c.key not in _BUILTIN_KEYS]
        if tcode in PRIMITIVES or tcode in ("BackboneElement", "Element") or not tcode:
            type_path = elem.base_path
        else:
            type_path = tcode
        eff = (km, required, constraints, type_path)
        elem._eff[tcode] = eff
        return eff

    def _content_target(self, elem: Elem) -> Elem | None:
        ref = elem.content_ref or ""
        url, _, frag = ref.partition("#")
        plan = elem.plan if not url else self.plan(url)
        if plan is None:
            return None
        return plan.by_id.get(frag) or plan.by_path.get(frag)

    # ------------------------------------------------------------------ walking

    def _complex(self, run: _Run, obj: Any, elem: Elem, tcode: str, path: str, ipath: str,
                 resource: bool = False, primitive_ext: bool = False) -> None:
        if run.depth >= MAX_DEPTH:
            run.add("error", "too-costly", "nesting-too-deep",
                    f"{path or tcode}: elements are nested more than {MAX_DEPTH} levels deep; not checked further",
                    path)
            return
        run.depth += 1
        try:
            self._complex_walk(run, obj, elem, tcode, path, ipath, resource, primitive_ext)
        finally:
            run.depth -= 1

    def _complex_walk(self, run: _Run, obj: Any, elem: Elem, tcode: str, path: str, ipath: str,
                      resource: bool, primitive_ext: bool) -> None:
        if not isinstance(obj, dict):
            run.add("error", "structure", "json-type",
                    f"{path or tcode}: expected a JSON object for {tcode}, found {_jtype(obj)}", path)
            return
        if not obj:
            run.add("error", "structure", "empty-value",
                    "empty objects are not allowed (ele-1: an element must have a value or children)", path)
            return
        eff = elem._eff.get(tcode)
        km, required, constraints, type_path = eff if eff is not None else self._effective(elem, tcode)
        prim_ok = self._prim_ok
        if not required and not primitive_ext and not resource:
            # Leaf objects (Coding, Identifier, Period …) whose properties are all plain primitives with
            # known-good values: nothing else to check but the invariants. Anything else takes the full walk.
            for key, val in obj.items():
                hit = km.get(key)
                if hit is None or type(val) is not str:
                    break
                child = hit[0]
                fp = child.fast1
                if fp is not None:
                    if _PRIM_CACHE.get((fp, val), _MISSING) is not None:
                        break
                elif not child.memo1 or (child, val) not in prim_ok:
                    break
            else:
                if constraints:
                    self._invariants(run, constraints, obj, type_path, path or tcode)
                return
        groups: dict[Elem, list[tuple[Any, Any, str | None, bool]]] = {}
        seen_choice: dict[Elem, str] = {}
        prim_ext: dict[str, Any] = _EMPTY
        for key in obj:
            if key[0] == "_":
                prim_ext = {k[1:]: v for k, v in obj.items() if k[0] == "_"}
                break
        for key, val in obj.items():
            if key[0] == "_":
                continue
            if key == "resourceType" and resource:
                continue
            hit = km.get(key) if not (primitive_ext and key == "value") else None
            if hit is None:
                if primitive_ext and key == "value":
                    run.add("error", "structure", "unknown-element",
                            "the value of a primitive goes in the plain property, not inside '_'", path)
                    continue
                self._unknown(run, key, km, path, resource)
                continue
            child, ct = hit
            if not primitive_ext and key not in prim_ext:
                # Plain primitive(s) with no '_' twin, or a remembered good value: checked inline below.
                if child.fast_prim is not None:
                    if type(val) is str:
                        if not child.many:
                            groups[child] = (val,)  # type: ignore[assignment]
                            continue
                    elif child.many and type(val) is list and val and all(type(x) is str for x in val):
                        groups[child] = (val, True)  # type: ignore[assignment]
                        continue
                elif child.memo1 and type(val) is str and (child, val) in prim_ok:
                    groups[child] = (val,)  # type: ignore[assignment]
                    continue
            if child.choice:
                other = seen_choice.get(child)
                if other is not None:
                    run.add("error", "structure", "choice-multiple",
                            f"only one of {other} and {key} may be present ({child.name}[x])", _join(path, key))
                    continue
                seen_choice[child] = key
            groups[child] = self._items(run, child, ct, key, val, prim_ext.get(key, _MISSING), path)
        for key, ext in prim_ext.items():
            if key in obj:
                continue
            hit = km.get(key)
            if hit is None or (hit[1] not in PRIMITIVES):
                run.add("error", "structure", "unknown-element",
                        f"unknown element '_{key}'" + (f" in {tcode}" if tcode else ""), _join(path, "_" + key))
                continue
            child, ct = hit
            if child.choice:
                if child in seen_choice:
                    run.add("error", "structure", "choice-multiple",
                            f"only one of {seen_choice[child]} and {key} may be present", _join(path, key))
                    continue
                seen_choice[child] = key
            groups[child] = self._items(run, child, ct, key, _MISSING, ext, path)
        dar = False
        if required:
            exts = obj.get("extension")
            if isinstance(exts, list):
                dar = any(isinstance(x, dict) and x.get("url") == DAR_URL for x in exts)
        for child in required:
            if child not in groups and not dar:
                self._missing(run, child, path, tcode)
        host: tuple[str, ...] | None = None
        for child, items in groups.items():
            cpath = f"{path}.{child.name}" if path else child.name
            if type(items) is tuple:
                self._fast_prims(run, child, items, cpath, path, tcode, dar)
                continue
            n = len(items)
            if n > child.max:
                run.add("error", "structure", "cardinality-max",
                        f"{cpath}: at most {child.max} allowed, found {n} ({_where(run, child)})", cpath)
            if n < child.min and not dar:
                self._missing(run, child, path, tcode, n)
            if host is None:
                host = (tcode, elem.path, elem.base_path)
            cipath = ipath + "." + child.name
            assigned = self._slicing(run, child, items, cpath, dar) \
                if child.slicing is not None and child.slices else None
            for i, (value, ext, ct, arr) in enumerate(items):
                vpath = f"{cpath}[{i}]" if arr else cpath
                if child.choice and ct:
                    vpath = f"{cpath}.ofType({ct})"
                s = child.slices[assigned[i]] if assigned is not None and assigned[i] >= 0 else None
                if s is None:
                    self._value(run, child, ct, value, ext, vpath, cipath, host=host)
                    continue
                sct = ct
                if s.types and ct not in s.type_codes and len(s.types) == 1 and not child.choice:
                    sct = s.types[0].code
                if s.sub and not child.choice:
                    # The slice's expanded children include everything the sliced element says: one walk.
                    self._value(run, s, sct, value, ext, vpath, cipath, host=host)
                else:
                    self._value(run, child, ct, value, ext, vpath, cipath, host=host)
                    self._value(run, s, sct, value, ext, vpath, cipath, from_slice=True)
        if constraints:
            self._invariants(run, constraints, obj, type_path, path or tcode)

    def _fast_prims(self, run: _Run, child: Elem, items: tuple[Any, ...], cpath: str, path: str, tcode: str,
                    dar: bool) -> None:
        """Plain primitive values (a string, or an array of strings): cardinality and the format rule."""
        tc = child.fast_prim
        if tc is None:
            return  # a remembered (element, value) pair: all its checks passed before; cardinality 1 is fine
        if len(items) == 1:
            vals: list[str] = [items[0]]
            arr = False
        else:
            vals = items[0]
            arr = True
        n = len(vals)
        if n > child.max:
            run.add("error", "structure", "cardinality-max",
                    f"{cpath}: at most {child.max} allowed, found {n} ({_where(run, child)})", cpath)
        if n < child.min and not dar:
            self._missing(run, child, path, tcode, n)
        for i, value in enumerate(vals):
            if len(value) < 256:
                err = _PRIM_CACHE.get((tc, value), _MISSING)  # type: ignore[arg-type]
                if err is _MISSING:
                    err = _PRIM_CACHE[(tc, value)] = check_primitive(tc, value)  # type: ignore[arg-type,index]
            else:
                err = check_primitive(tc, value)  # type: ignore[arg-type]
            if err:
                vpath = f"{cpath}[{i}]" if arr else cpath
                run.add("error", "structure" if "JSON" in err else "value",
                        "json-type" if "JSON" in err else "primitive-format", f"{vpath}: {err} ({tc})", vpath)

    def _unknown(self, run: _Run, key: str, km: dict[str, Any], path: str, resource: bool) -> None:
        hint = ""
        for k in km:
            if key.startswith(k) or k.startswith(key):
                hint = f" (did you mean '{k}'?)"
                break
        if key in ("resourceType",):
            msg = "resourceType is only allowed at the root of a resource"
        else:
            msg = f"unknown element '{key}'{hint}"
        run.add("error", "structure", "unknown-element", msg, _join(path, key))

    def _missing(self, run: _Run, child: Elem, path: str, tcode: str, found: int = 0) -> None:
        cpath = _join(path, child.name)
        remedy = (f"If the data is not available, send the data-absent-reason extension ({DAR_URL}) "
                  "in its place")
        if child.min > found:
            run.add("error", "required", "cardinality-min",
                    f"{cpath}: minimum required = {child.min}, found {found} ({_where(run, child)}). {remedy}",
                    cpath)
        if found == 0:
            for s in child.slices:
                if s.min > 0:
                    run.add("error", "required", "slice-cardinality-min",
                            f"{cpath}: slice '{s.slice_name}' requires at least {s.min}, found 0 "
                            f"({_where(run, child)}). {remedy}", cpath)

    def _items(self, run: _Run, child: Elem, ct: str | None, key: str, val: Any, ext: Any,
               path: str) -> list[tuple[Any, Any, str | None, bool]]:
        """Normalise a property (and its ``_`` twin) into (value, extension, type, in-array) items."""
        if ext is _MISSING:
            if not child.many:
                if val is not None and type(val) is not list:
                    return [(val, None, ct, False)]
            elif type(val) is list and val and None not in val:
                return [(v, None, ct, True) for v in val]
        kpath = _join(path, key)
        if child.many:
            vals = val if isinstance(val, list) else ([] if val is _MISSING else None)
            if vals is None:
                run.add("error", "structure", "array-expected",
                        f"{kpath} must be a JSON array (the element repeats)", kpath)
                vals = [val]
            exts = ext if isinstance(ext, list) else ([] if ext is _MISSING else None)
            if exts is None:
                run.add("error", "structure", "array-expected", f"_{key} must be a JSON array", kpath)
                exts = []
            if (val is not _MISSING and not vals) or (ext is not _MISSING and not exts):
                run.add("error", "structure", "empty-value", f"{kpath}: empty arrays are not allowed", kpath)
            if exts and vals and len(exts) != len(vals):
                run.add("error", "structure", "primitive-array-mismatch",
                        f"{key} and _{key} must have the same length", kpath)
            n = max(len(vals), len(exts))
            out = []
            for i in range(n):
                v = vals[i] if i < len(vals) else None
                x = exts[i] if i < len(exts) else None
                if v is None and x is None:
                    run.add("error", "structure", "null-value", f"{kpath}[{i}]: null is not allowed here",
                            f"{kpath}[{i}]")
                    continue
                out.append((v, x, ct, True))
            return out
        if isinstance(val, list):
            run.add("error", "structure", "array-unexpected",
                    f"{kpath} must not be an array (the element does not repeat)", kpath)
            return [(v, None, ct, False) for v in val if v is not None][:1]
        if isinstance(ext, list):
            run.add("error", "structure", "array-unexpected", f"_{key} must not be an array", kpath)
            ext = _MISSING
        v = None if val is _MISSING else val
        x = None if ext is _MISSING else ext
        if v is None and x is None:
            run.add("error", "structure", "null-value", f"{kpath}: null is not allowed", kpath)
            return []
        return [(v, x, ct, False)]

    # ------------------------------------------------------------------ values

    def _value(self, run: _Run, elem: Elem, tcode: str | None, value: Any, ext: Any, path: str, ipath: str,
               from_slice: bool = False, host: tuple[str, ...] = ()) -> None:
        if tcode is None:
            if elem.content_ref:
                target = self._content_target(elem)
                if target is None:
                    return
                tcode = "BackboneElement"
                if value is not None:
                    self._complex(run, value, target, tcode, path, ipath)
                return
            if not elem.types:
                return
            tcode = elem.types[0].code
        if tcode in PRIMITIVES:
            self._primitive(run, elem, tcode, value, ext, path, ipath, from_slice)
            return
        if from_slice and not elem.sub and tcode == "Extension":
            # The extension was walked by URL as an item of the sliced element; only slice rules remain.
            self._value_rules(run, elem, tcode, value, path)
            return
        if tcode == "Resource" or tcode in self._resource_types:
            if not from_slice or (elem.types and elem.types[0].profiles):
                self._nested_resource(run, elem, tcode, value, path)
            return
        if not isinstance(value, dict):
            run.add("error", "structure", "json-type",
                    f"{path}: expected a JSON object ({tcode}), found {_jtype(value)}", path)
            return
        if not from_slice or elem.sub:
            self._complex(run, value, elem, tcode, path, ipath)
        if tcode == "Extension" and not from_slice:
            self._extension(run, elem, value, path, ipath, host)
        for t in elem.types:
            if t.code == tcode and t.profiles and tcode != "Extension":
                for prof in t.profiles:
                    p = self.plan(prof)
                    if p is None and self._unusable(run, prof, path):
                        continue
                    if p is None:
                        run.add("warning", "not-found", "profile-unknown",
                                f"{path}: type profile {prof} is not known; not checked", path)
                    elif p.url != BASE + tcode:
                        self._complex(run, value, p.root, tcode, path, ipath)
        if elem.fixed is not None or elem.pattern is not None or elem.binding is not None or tcode == "Quantity":
            self._value_rules(run, elem, tcode, value, path)
        if tcode == "Reference" and not from_slice:
            self._reference(run, elem, value, path)

    def _value_rules(self, run: _Run, elem: Elem, tcode: str, value: Any, path: str) -> None:
        if elem.fixed is not None and not _equal(elem.fixed, value):
            run.add("error", "value", "fixed-value",
                    f"{path}: value must be exactly {_short(elem.fixed)} ({_where(run, elem)})", path)
        if elem.pattern is not None and not _pattern(elem.pattern, value):
            run.add("error", "value", "pattern-value",
                    f"{path}: value must match the pattern {_short(elem.pattern)} ({_where(run, elem)})", path)
        if elem.binding is not None and tcode in _CODED:
            self._binding(run, elem, tcode, value, path)
        if tcode == "Quantity" and isinstance(value, dict):
            self._limits(run, elem, value.get("value"), path)

    def _primitive(self, run: _Run, elem: Elem, tcode: str, value: Any, ext: Any, path: str, ipath: str,
                   from_slice: bool) -> None:
        if elem.plain and ext is None and type(value) is str and not from_slice and tcode != "xhtml" \
                and len(value) < 256 and not (tcode == "id" and elem.name == "id"):
            # Hot path: a plain string element; only the (cached) format rule applies.
            err = _PRIM_CACHE.get((tcode, value), _MISSING)
            if err is _MISSING:
                err = _PRIM_CACHE[(tcode, value)] = check_primitive(tcode, value)
            if err:
                run.add("error", "structure" if "JSON" in err else "value",
                        "json-type" if "JSON" in err else "primitive-format", f"{path}: {err} ({tcode})", path)
            return
        n0, u0 = run.n_add, run.unchecked
        if value is not None:
            if not from_slice:
                # Element ids (not Resource.id) are strings in practice: the spec's own examples use
                # 'Timing.repeat.bounds[x]' as element ids.
                ptype = "string" if tcode == "id" and elem.name == "id" and elem.base_path != "Resource.id" \
                    else tcode
                ckey = (ptype, value) if isinstance(value, str) and len(value) < 256 else None
                err = _PRIM_CACHE.get(ckey, _MISSING) if ckey is not None else _MISSING
                if err is _MISSING:
                    err = check_primitive(ptype, value)
                    if ckey is not None:
                        if len(_PRIM_CACHE) > 100_000:
                            _PRIM_CACHE.clear()
                        _PRIM_CACHE[ckey] = err
                if err:
                    code = "structure" if "JSON" in err else "value"
                    run.add("error", code, "primitive-format" if code == "value" else "json-type",
                            f"{path}: {err} ({tcode})", path)
                    return
                if tcode == "xhtml":
                    for p in check_xhtml(value):
                        run.add("error", "security" if "not allowed" in p or "external" in p else "invalid",
                                "xhtml-unsafe" if "not allowed" in p or "external" in p else "xhtml-invalid",
                                f"{path}: {p} (txt-1/txt-2)", path)
            if elem.fixed is not None and not _equal(elem.fixed, value):
                run.add("error", "value", "fixed-value",
                        f"{path}: value must be exactly {_short(elem.fixed)}, found {_short(value)} "
                        f"({_where(run, elem)})", path)
            if elem.pattern is not None and not _equal(elem.pattern, value):
                run.add("error", "value", "pattern-value",
                        f"{path}: value must be {_short(elem.pattern)}, found {_short(value)} "
                        f"({_where(run, elem)})", path)
            if elem.max_length is not None and isinstance(value, str) and len(value) > elem.max_length:
                run.add("error", "value", "max-length",
                        f"{path}: longer than maxLength {elem.max_length} ({len(value)} characters)", path)
            if elem.min_value is not None or elem.max_value is not None:
                self._limits(run, elem, value, path)
            if elem.binding is not None and tcode in _CODED and isinstance(value, str):
                self._binding(run, elem, tcode, value, path)
        elif elem.fixed is not None or elem.pattern is not None:
            run.add("error", "value", "fixed-value",
                    f"{path}: value {_short(elem.fixed if elem.fixed is not None else elem.pattern)} "
                    f"is required ({_where(run, elem)})", path)
        if ext is not None and not from_slice:
            self._complex(run, ext, elem, tcode, path, ipath, primitive_ext=True)
        if elem.constraints and not from_slice:
            _, _, constraints, type_path = self._effective(elem, tcode)
            if constraints:
                self._invariants(run, constraints, value, type_path, path, primitive=True,
                                 has_ext=isinstance(ext, dict) and bool(ext))
        if elem.memo1 and ext is None and not from_slice and type(value) is str and run.n_add == n0 \
                and run.unchecked == u0:
            if len(self._prim_ok) > 200_000:
                self._prim_ok.clear()
            self._prim_ok.add((elem, value))

    def _limits(self, run: _Run, elem: Elem, value: Any, path: str) -> None:
        for bound, lo in ((elem.min_value, True), (elem.max_value, False)):
            if bound is None or value is None:
                continue
            if isinstance(bound, dict):
                bound = bound.get("value")
            try:
                if isinstance(bound, int | Decimal) and not isinstance(bound, bool):
                    bad = Decimal(str(value)) < Decimal(str(bound)) if lo else Decimal(str(value)) > Decimal(str(bound))
                else:
                    bad = str(value) < str(bound) if lo else str(value) > str(bound)
            except (ArithmeticError, ValueError):
                continue
            if bad:
                run.add("error", "value", "min-value" if lo else "max-value",
                        f"{path}: {value} is {'below the minimum' if lo else 'above the maximum'} {bound} "
                        f"({_where(run, elem)})", path)

    # ------------------------------------------------------------------ nested resources

    def _nested_resource(self, run: _Run, elem: Elem, tcode: str, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            run.add("error", "structure", "json-type", f"{path}: expected a resource (JSON object)", path)
            return
        rt = value.get("resourceType")
        if not isinstance(rt, str):
            run.add("error", "structure", "resource-type",
                    f"{path}: a contained or entry resource needs a resourceType", path)
            return
        if rt not in self._resource_types:
            run.add("error", "structure", "resource-type", f"{path}: unknown resourceType '{rt}'", path)
            return
        allowed = {t.code for t in elem.types}
        if not allowed & ({rt, "Resource"} | _ABSTRACT_CONTAINERS) and not any(
                self._is_a(rt, a) for a in allowed):
            run.add("error", "structure", "type-not-allowed",
                    f"{path}: resource type {rt} is not allowed here (allowed: {', '.join(sorted(allowed))})", path)
            return
        rpath = f"{path}.ofType({rt})"
        base = self.type_plan(rt)
        plans: list[Plan] = [base] if base is not None else []
        for t in elem.types:
            for prof in t.profiles:
                p = self.plan(prof)
                if p is not None and p.type == rt and p.url != BASE + rt:
                    plans.append(p)
        meta = value.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("profile"), list):
            for prof in meta["profile"]:
                if not isinstance(prof, str):
                    continue
                p = self.plan(prof)
                if p is None and self._unusable(run, prof, rpath):
                    continue
                if p is None:
                    run.add("warning", "not-found", "profile-unknown",
                            f"{rpath}: meta.profile {prof} is not known; the resource is checked against "
                            "the base definition only", rpath)
                elif p.type == rt and all(p.key != q.key for q in plans):
                    plans.append(p)
        for p in plans:
            done = (id(value), p.key, run.profile, rpath)
            if done in run.nested_done:
                continue
            run.nested_done.add(done)
            self._resource(run, value, p, rpath, contained=elem.name == "contained")

    def _is_a(self, rtype: str, ancestor: str) -> bool:
        p = self.type_plan(rtype)
        seen = 0
        while p is not None and seen < 6:
            base = p.sd.get("baseDefinition") or ""
            if base.endswith("/" + ancestor):
                return True
            p = self.plan(base) if base else None
            seen += 1
        return False

    # ------------------------------------------------------------------ extensions

    def _extension(self, run: _Run, elem: Elem, ext: dict[str, Any], path: str, ipath: str,
                   host: tuple[str, ...] = ()) -> None:
        url = ext.get("url")
        if not isinstance(url, str):
            return  # the Extension plan reports the missing url
        modifier = elem.name == "modifierExtension"
        if "/" not in url and ":" not in url and ipath.rsplit(".", 1)[0].endswith(("extension", "Extension")):
            return  # a sub-extension of a complex extension: its local name is matched by the parent's slices
        p = self.plan(url)
        if p is None and self._unusable(run, url, path):
            return
        if p is None or p.type != "Extension":
            closed = elem.slicing is not None and elem.slicing.rules == "closed"
            if not url.startswith(("http://", "https://", "urn:")):
                run.add("error", "value", "extension-url", f"{path}.url: extension url must be absolute", path)
            sev = "error" if modifier or closed else "warning"
            run.add(sev, "extension" if sev == "warning" else "structure", "extension-unknown",
                    f"{path}: unknown extension {url}" + (
                        " (modifier extensions must be understood)" if modifier else
                        " (the profile does not allow extensions other than those it defines)" if closed else
                        "; its content is checked against the base Extension only"), path)
            return
        ckey = (p.key, ipath, id(elem), host)
        ok = self._contexts.get(ckey)
        if ok is None:
            ok = self._contexts[ckey] = not p.sd.get("context") or self._context_ok(p, ipath, elem, host)
        if not ok:
            ctx = ", ".join(str(c.get("expression")) for c in p.sd.get("context") or ())
            run.add("error", "structure", "extension-context",
                    f"{path}: extension {url} is not allowed here ({ipath.rsplit('.', 1)[0]}); "
                    f"allowed contexts: {ctx}", path)
        mod_flag = _sd_is_modifier(p.sd)
        if mod_flag is not None and mod_flag != modifier:
            run.add("error", "structure", "extension-modifier",
                    f"{path}: extension {url} " + ("is not a modifier extension" if modifier else
                                                   "is a modifier extension and must be in modifierExtension"),
                    path)
        self._complex(run, ext, p.root, "Extension", path, ipath)

    def _unusable(self, run: _Run, url: str, path: str) -> bool:
        """Report a StructureDefinition that exists but cannot be used (an error: what it requires is
        unknown, so nothing can be said to conform to it); False when ``url`` is simply not known."""
        why = self.plan_error(url)
        if why is None:
            return False
        run.add("error", "invalid", "profile-unusable",
                f"{path}: StructureDefinition {url} cannot be used for validation: {why}", path)
        return True

    def _context_ok(self, p: Plan, ipath: str, elem: Elem, host_names: tuple[str, ...] = ()) -> bool:
        # ipath is the instance path of the extension element, e.g. Patient.gender.extension; host_names
        # are the host element's type, definition path and base path (string, HumanName.family, …).
        host = ipath.rsplit(".", 1)[0]
        names = {host, *host_names}
        host_elem_path = elem.path.rsplit(".", 1)[0] if "." in elem.path else elem.path
        names.add(host_elem_path)
        base_host = elem.base_path.rsplit(".", 1)[0] if "." in elem.base_path else elem.base_path
        names.add(base_host)
        # The type of the host (Address for Patient.address.extension) and its ancestors.
        parent_type = base_host.split(".")[0]
        names.update({"Element", "Base", "DataType", "BackboneElement", "PrimitiveType"})
        root_type = host.split(".")[0]
        if "." not in host:
            names.update({root_type, "Resource", "DomainResource", "CanonicalResource", "MetadataResource"})
        names.add(parent_type)
        for ctx in p.sd.get("context") or ():
            ctype, expr = ctx.get("type"), str(ctx.get("expression") or "")
            if ctype == "fhirpath":
                return True
            if ctype == "extension":
                # Allowed inside an extension (on it, or on its value's primitive extension).
                if ".extension" in host or host.endswith("Extension") or host.startswith("Extension"):
                    return True
                continue
            if expr in names or (expr.split(".")[-1] == host.split(".")[-1] and expr.split(".")[0] in (
                    root_type, parent_type)):
                return True
            if expr == root_type and "." not in host:
                return True
            if "." not in expr and self._is_a(root_type, expr) and "." not in host:
                return True
        return False

    # ------------------------------------------------------------------ references

    def _reference(self, run: _Run, elem: Elem, value: dict[str, Any], path: str) -> None:
        ref = value.get("reference")
        if not isinstance(ref, str):
            return
        targets: list[str] = []
        for t in elem.types:
            if t.code == "Reference":
                targets.extend(t.targets)
        target = self.resolve_reference(run, ref) if (run.bundles or ref.startswith("#")) else None
        rtype = None
        if target is not None:
            # The target's own resourceType errors are reported where it stands; a non-string one
            # (an object, a number) says nothing about the reference's type.
            rt = target.get("resourceType")
            rtype = rt if isinstance(rt, str) else None
        else:
            m = _REF_RE.search(ref)
            if m and m.group(1) in self._resource_types:
                rtype = m.group(1)
        if ref.startswith("#") and target is None and ref != "#":
            run.add("error", "not-found", "reference-unresolved",
                    f"{path}: contained resource {ref} not found (ref-1)", path + ".reference")
            return
        if run.bundles and target is None and not ref.startswith("#"):
            bundle_type = None
            for c in run.containers:
                if c.get("resourceType") == "Bundle":
                    bundle_type = c.get("type")
            if bundle_type == "document":
                run.add("warning", "not-found", "reference-unresolved",
                        f"{path}: {ref} is not in the document Bundle (a document should carry every resource "
                        "it references)", path + ".reference")
        if not targets or rtype is None:
            return
        allowed: dict[str, list[str]] = {}
        for tp in targets:
            if tp.startswith(BASE):
                allowed.setdefault(tp[len(BASE):], [])
            else:
                p = self.plan(tp)
                if p is not None:
                    allowed.setdefault(p.type, []).append(tp)
        if not allowed or "Resource" in allowed:
            return
        if rtype not in allowed:
            run.add("error", "structure", "reference-type",
                    f"{path}: reference to {rtype} is not allowed; allowed targets: "
                    f"{', '.join(sorted(allowed))} ({_where(run, elem)})", path + ".reference")
            return
        profs = allowed[rtype]
        if target is not None and profs and len(profs) == len([t for t in targets if not t.startswith(BASE)
                                                                 and self._plan_type(t) == rtype]):
            if not any(self.conforms(run, target, prof) for prof in profs):
                run.add("error", "structure", "reference-target-profile",
                        f"{path}: the referenced {rtype} ({ref}) does not conform to "
                        f"{' or '.join(profs)} ({_where(run, elem)})", path + ".reference")

    def _plan_type(self, url: str) -> str | None:
        p = self.plan(url)
        return p.type if p is not None else None

    def conforms(self, run: _Run, value: Any, profile: str, tcode: str | None = None) -> bool:
        """Does ``value`` conform to ``profile``? Used by slicing (profile discriminator), conformsTo()
        and targetProfile checks; errors go to a private run."""
        key = (id(value), profile)
        hit = run.conform_cache.get(key)
        if hit is not None:
            return hit
        p = self.plan(profile)
        if p is None:
            run.conform_cache[key] = False
            return False
        sub = _Run(silent=True)
        sub.bundles = run.bundles
        sub.full_urls = run.full_urls
        sub.containers = list(run.containers)
        sub.contained_flags = list(run.contained_flags)
        sub.conform_cache = run.conform_cache
        sub.depth = run.depth  # the stack is shared: keep counting from here
        # So are the invariant steps: a profile reached this way (slicing, targetProfile, conformsTo()) must not
        # bring a fresh budget. Inside an invariant, that invariant's own budget counts the nested steps.
        sub.steps_left = run.steps_left
        in_invariant = fastpath.budget_left() is not None
        run.conform_cache[key] = True  # break cycles
        if isinstance(value, dict) and value.get("resourceType") and p.kind == "resource":
            if value.get("resourceType") != p.type:
                ok = False
            else:
                self._resource(sub, value, p, p.type)
                ok = sub.errors == 0
        else:
            self._complex(sub, value, p.root, tcode or p.type, p.type, p.type)
            ok = sub.errors == 0
        if not in_invariant:
            run.steps_left = sub.steps_left
        elif any(i.message_id == "invariant-too-costly" for i in sub.issues):
            # The enclosing invariant's budget ran out in there: no verdict, the enclosing one is too costly.
            run.conform_cache.pop(key, None)
            raise fastpath.TooCostly(f"conformsTo({profile}) needs too many evaluation steps")
        run.conform_cache[key] = ok
        return ok

    # ------------------------------------------------------------------ terminology

    def check_code(self, system: str | None, code: str, valueset: str | None) -> CodeCheck | None:
        if self.terminology is None:
            return None
        if not (system is None or isinstance(system, str)) or not isinstance(code, str):
            # A system of the wrong JSON type (object, number) is a structural error reported elsewhere;
            # it cannot be a cache key nor a code system URL.
            return CodeCheck(None, "system is not a string", system_known=False)
        key = (system, code, valueset)
        hit = self._codes.get(key)
        if hit is None:
            try:
                hit = self.terminology.validate_code(system, code, valueset)
            except Exception as e:  # a terminology failure is "not checked", never a verdict
                hit = CodeCheck(None, f"terminology service failed: {e}", system_known=False)
            if len(self._codes) > 200_000:
                self._codes.clear()
            self._codes[key] = hit
        return hit

    def _binding(self, run: _Run, elem: Elem, tcode: str, value: Any, path: str) -> None:
        strength, vs = elem.binding  # type: ignore[misc]
        if strength not in ("required", "extensible"):
            return
        codes: list[tuple[str | None, str]] = []
        if tcode in ("code", "string", "uri"):
            if isinstance(value, str):
                codes.append((None, value))
        elif tcode == "Coding":
            if isinstance(value, dict) and isinstance(value.get("code"), str):
                codes.append((value.get("system"), value["code"]))
        elif tcode in ("CodeableConcept", "CodeableReference"):
            cc = value.get("concept") if tcode == "CodeableReference" and isinstance(value, dict) else value
            if tcode == "CodeableReference" and cc is None:
                return
            if isinstance(cc, dict):
                for c in _arr(cc.get("coding")):
                    if isinstance(c, dict) and isinstance(c.get("code"), str):
                        codes.append((c.get("system"), c["code"]))
                if not codes and strength == "required" and not _has_dar(cc):
                    run.add("error", "code-invalid", "binding-required",
                            f"{path}: no code provided, and a code from {vs} is required "
                            f"({_where(run, elem)})", path)
                    return
        elif tcode == "Quantity":
            if isinstance(value, dict) and isinstance(value.get("code"), str):
                codes.append((value.get("system"), value["code"]))
        if not codes:
            return
        if self.terminology is None:
            run.unchecked += 1
            return
        unknown: list[str] = []
        bad: list[str] = []
        for system, code in codes:
            chk = self.check_code(system, code, vs)
            if chk is None:
                continue
            if chk.result is True:
                return
            label = f"{system}|{code}" if system else code
            if chk.result is None:
                unknown.append(f"{label}: {chk.message}" if chk.message else label)
            else:
                bad.append(label)
        if unknown:
            run.add("information", "informational", "binding-not-checked",
                    f"{path}: code {'; '.join(unknown)} not checked against {vs} (code system or value set "
                    f"not loaded here)", path)
            return
        if strength == "required":
            run.add("error", "code-invalid", "binding-required",
                    f"{path}: {', '.join(bad)} is not in the required value set {vs} ({_where(run, elem)})", path)
        else:
            run.add("warning", "code-invalid", "binding-extensible",
                    f"{path}: {', '.join(bad)} is not in the extensible value set {vs} ({_where(run, elem)})", path)

    def _member_of(self, value: Any, vs: str) -> bool | None:
        codes: list[tuple[str | None, str]] = []
        if isinstance(value, str):
            codes = [(None, value)]
        elif isinstance(value, dict):
            if isinstance(value.get("code"), str):
                codes = [(value.get("system"), value["code"])]
            for c in _arr(value.get("coding")):
                if isinstance(c, dict) and isinstance(c.get("code"), str):
                    codes.append((c.get("system"), c["code"]))
        answers = [self.check_code(s, c, vs) for s, c in codes]
        if any(a is not None and a.result for a in answers):
            return True
        if answers and all(a is not None and a.result is False for a in answers):
            return False
        return None

    # ------------------------------------------------------------------ slicing

    def _slicing(self, run: _Run, elem: Elem, items: list[tuple[Any, Any, str | None, bool]], path: str,
                 dar: bool) -> list[int]:
        """Assign items to slices (index, -1 for none) and check slice cardinality, closure and order."""
        slicing = elem.slicing
        assert slicing is not None
        slices = elem.slices
        assigned: list[int] = []
        counts = [0] * len(slices)
        table = self._slice_tables.get(id(elem), _MISSING)
        if table is _MISSING:
            table = self._slice_tables[id(elem)] = self._slice_table(elem)
        for value, _ext, ct, _arr in items:
            hit = -1
            if table is not None:
                # One fixed primitive per slice at one path (identifier.system, extension.url): a dict lookup.
                for x in _path_values(self, run, value, slicing.discriminators[0].path):
                    if isinstance(x, str | int) and x in table:
                        hit = table[x]
                        break
            else:
                for si, s in enumerate(slices):
                    if self._slice_match(run, elem, s, si, value, ct, len(assigned)):
                        hit = si
                        break
            assigned.append(hit)
            if hit >= 0:
                counts[hit] += 1
        for si, s in enumerate(slices):
            if counts[si] < s.min and not dar:
                run.add("error", "required", "slice-cardinality-min",
                        f"{path}: slice '{s.slice_name}' requires at least {s.min}, found {counts[si]} "
                        f"({_where(run, elem)}). If the data is not available, send the data-absent-reason "
                        f"extension ({DAR_URL})", path)
            if counts[si] > s.max:
                run.add("error", "structure", "slice-cardinality-max",
                        f"{path}: slice '{s.slice_name}' allows at most {s.max}, found {counts[si]} "
                        f"({_where(run, elem)})", path)
        last = -1
        seen_unmatched = False
        for i, hit in enumerate(assigned):
            ipath_i = f"{path}[{i}]" if items[i][3] else path
            if hit < 0:
                seen_unmatched = True
                if slicing.rules == "closed":
                    run.add("error", "structure", "slice-unmatched",
                            f"{ipath_i}: does not match any of the defined slices "
                            f"({', '.join(str(s.slice_name) for s in slices)}) and the slicing is closed "
                            f"({_where(run, elem)})", ipath_i)
                continue
            if slicing.rules == "openAtEnd" and seen_unmatched:
                run.add("error", "structure", "slice-order",
                        f"{ipath_i}: items that match no slice must come after all sliced items (openAtEnd)",
                        ipath_i)
            if slicing.ordered and hit < last:
                run.add("error", "structure", "slice-order",
                        f"{ipath_i}: slice '{slices[hit].slice_name}' is out of order (the slicing is ordered)",
                        ipath_i)
            last = max(last, hit)
        return assigned

    def _slice_table(self, elem: Elem) -> dict[Any, int] | None:
        assert elem.slicing is not None
        ds = elem.slicing.discriminators
        if len(ds) != 1 or ds[0].type not in ("value", "pattern"):
            return None
        table: dict[Any, int] = {}
        for si, s in enumerate(elem.slices):
            fixed = None
            for t in self._slice_targets(s, ds[0].path):
                fixed = t.fixed if t.fixed is not None else t.pattern
                if fixed is not None:
                    break
            if not isinstance(fixed, str | int) or isinstance(fixed, bool) or fixed in table:
                return None
            table[fixed] = si
        return table

    def _slice_match(self, run: _Run, elem: Elem, s: Elem, si: int, value: Any, ct: str | None,
                     position: int) -> bool:
        matchers = self._matchers.get(id(s))
        if matchers is None:
            matchers = self._build_matchers(elem, s, si)
            self._matchers[id(s)] = matchers
        if not matchers:
            return False
        return all(m(self, run, value, ct, position) for m in matchers)

    def _build_matchers(self, elem: Elem, s: Elem, si: int) -> list[Callable[..., bool]]:
        out: list[Callable[..., bool]] = []
        assert elem.slicing is not None
        for d in elem.slicing.discriminators:
            path = d.path
            dtype = d.type
            if dtype == "position":
                out.append(lambda v, run, value, ct, pos, _si=si: pos == _si)
                continue
            targets = self._slice_targets(s, path)
            if dtype in ("value", "pattern"):
                fixed = None
                is_pattern = False
                binding = None
                for t in targets:
                    if t.fixed is not None:
                        fixed = t.fixed
                        break
                    if t.pattern is not None:
                        fixed, is_pattern = t.pattern, True
                        break
                    if t.binding is not None and t.binding[0] == "required":
                        binding = t.binding[1]
                if fixed is not None:
                    def m(v: Validator, run: _Run, value: Any, ct: str | None, pos: int, _p: str = path,
                          _f: Any = fixed, _pat: bool = is_pattern) -> bool:
                        vals = _path_values(v, run, value, _p)
                        if _pat:
                            return any(_pattern(_f, x) for x in vals)
                        return any(_equal(_f, x) for x in vals)
                    out.append(m)
                elif binding is not None:
                    def mb(v: Validator, run: _Run, value: Any, ct: str | None, pos: int, _p: str = path,
                           _vs: str = binding) -> bool:
                        return any(v._member_of(x, _vs) is True for x in _path_values(v, run, value, _p))
                    out.append(mb)
                else:
                    # Nothing to tell slices apart by: the slice never matches on its own.
                    out.append(lambda v, run, value, ct, pos: False)
            elif dtype == "exists":
                must = any(t.min > 0 for t in targets)
                never = any(t.max == 0 for t in targets)
                out.append(lambda v, run, value, ct, pos, _p=path, _m=must, _n=never:
                           (bool(_path_values(v, run, value, _p)) if _m else True)
                           and (not _path_values(v, run, value, _p) if _n else True))
            elif dtype == "type":
                codes: set[str] = set()
                for t in targets:
                    codes |= set(t.type_codes)
                    for tr in t.types:
                        for prof in tr.profiles:
                            pl = self.plan(prof)
                            if pl is not None:
                                codes.add(pl.type)
                if path.endswith("resolve()"):
                    for t in targets:
                        for tr in t.types:
                            for tp in tr.targets:
                                pl = self.plan(tp)
                                if pl is not None:
                                    codes.add(pl.type)

                def mt(v: Validator, run: _Run, value: Any, ct: str | None, pos: int, _p: str = path,
                       _c: frozenset[str] = frozenset(codes)) -> bool:
                    if _p in ("$this", "") and ct is not None:
                        return ct in _c
                    for x in _path_values(v, run, value, _p):
                        if isinstance(x, dict) and x.get("resourceType") in _c:
                            return True
                    return False
                out.append(mt)
            elif dtype == "profile":
                profs: list[str] = []
                for t in targets:
                    for tr in t.types:
                        profs.extend(tr.targets if path.endswith("resolve()") else tr.profiles)

                def mp(v: Validator, run: _Run, value: Any, ct: str | None, pos: int, _p: str = path,
                       _ps: tuple[str, ...] = tuple(profs)) -> bool:
                    for x in _path_values(v, run, value, _p):
                        if any(v.conforms(run, x, prof) for prof in _ps):
                            return True
                    return False
                out.append(mp)
        return out

    def _slice_targets(self, s: Elem, path: str) -> list[Elem]:
        """The element(s) a discriminator path points to inside a slice definition."""
        cur: list[Elem] = [s]
        for tok in _tokens(path):
            if tok == "$this":
                continue
            nxt: list[Elem] = []
            for el in cur:
                if tok.startswith("ofType(") or tok.startswith("as("):
                    nxt.append(el)
                    continue
                if tok == "resolve()":
                    nxt.append(el)
                    continue
                if tok.startswith("extension("):
                    url = tok[tok.index("(") + 2: -2]
                    ext_el = self._child(el, "extension")
                    found = False
                    if ext_el is not None:
                        for sl in ext_el.slices:
                            if any(url in tr.profiles for tr in sl.types) or (
                                    sl.sub.get("url") is not None and sl.sub["url"].fixed == url):
                                nxt.append(sl)
                                found = True
                    if not found:
                        p = self.plan(url)
                        if p is not None:
                            nxt.append(p.root)
                    continue
                ch = self._child(el, tok)
                if ch is not None:
                    nxt.append(ch)
            cur = nxt
        return cur

    def _child(self, el: Elem, name: str) -> Elem | None:
        if el.sub:
            c = el.sub.get(name)
            if c is not None:
                return c
        for tr in el.types:
            for prof in tr.profiles:
                p = self.plan(prof)
                if p is not None and name in p.root.sub:
                    return p.root.sub[name]
        if el.content_ref:
            t = self._content_target(el)
            if t is not None and name in t.sub:
                return t.sub[name]
        code = el.single_type()
        if code:
            p = self.type_plan(code)
            if p is not None:
                return p.root.sub.get(name)
        return None

    # ------------------------------------------------------------------ invariants

    def _invariants(self, run: _Run, constraints: list[Constraint], focus: Any, type_path: str, path: str,
                    primitive: bool = False, has_ext: bool = False) -> None:
        variables: dict[str, Any] | None = None
        for c in constraints:
            native = NATIVE.get(c.key)
            if native is not None:
                if primitive and c.key == "ele-1":
                    ok: bool | None = focus is not None or has_ext
                elif primitive:
                    ok = True
                else:
                    ok = native(self, run, focus, path)
            elif primitive and focus is None:
                continue
            elif not c.expression:
                run.add("warning", "informational", "invariant-not-evaluated",
                        f"{path}: constraint {c.key} has no FHIRPath expression and was not checked "
                        f"({c.human})", path)
                continue
            else:
                if variables is None:
                    variables = {
                        "resource": run.containers[-1] if run.containers else focus,
                        "rootResource": self._container_root(run) or focus,
                        "context": focus, "env": self._env(run),
                    }
                ok = self._evaluate(run, c, focus, type_path, variables, path)
            if ok is False:
                run.add(c.severity, "invariant", f"invariant-{c.key}",
                        f"{path}: constraint {c.key} failed: {c.human} ({_where(run, None)})", path)

    def _evaluate(self, run: _Run, c: Constraint, focus: Any, type_path: str, variables: dict[str, Any],
                  path: str) -> bool | None:
        """One FHIRPath invariant under the step budget (and, for API-written profiles, regex vetting); None,
        with the reason reported, when it could not be evaluated."""
        allowed = min(INVARIANT_STEPS, run.steps_left)
        enclosing = fastpath.budget_left()
        if enclosing is not None:
            # Nested in another invariant's evaluation (conformsTo(), a profile reached from it): share
            # what that one has left, or each nesting level would bring a fresh budget.
            allowed = max(0, min(allowed, enclosing))
        outer = fastpath.set_budget(allowed)
        trust = None if c.trusted else regexguard.set_trusted(False)  # API-written: vet its regexes
        try:
            try:
                return fastpath.truth(fastpath.evaluate(c.expression, focus, variables))
            except fastpath.Unsupported:
                res = fhirpath.evaluate(c.expression, focus, type_path, variables["env"], {
                    "resource": variables["resource"], "rootResource": variables["rootResource"]})
                return fhirpath.truthy(res)
        except fastpath.TooCostly:
            run.add("error", "too-costly", "invariant-too-costly",
                    f"{path}: constraint {c.key} was stopped: its evaluation takes too many steps "
                    f"(expression: {c.expression})", path)
            return None
        except RiskyRegex as e:
            run.add("error", "too-costly", "invariant-regex-refused",
                    f"{path}: constraint {c.key} was not evaluated: its {e} "
                    f"(expression: {c.expression})", path)
            return None
        except fhirpath.NotEvaluable as e:
            run.add("information", "informational", "invariant-not-evaluated",
                    f"{path}: constraint {c.key} not checked: {e}", path)
            return None
        except Exception as e:
            run.add("warning", "informational", "invariant-not-evaluated",
                    f"{path}: constraint {c.key} could not be evaluated ({type(e).__name__}: {e}); "
                    f"expression: {c.expression}", path)
            return None
        finally:
            used = allowed - (fastpath.budget_left() or 0)
            run.steps_left -= used
            fastpath.set_budget(None if outer is None else outer - used)
            if trust is not None:
                regexguard.set_trusted(trust)

    def _env(self, run: _Run) -> fhirpath.Env:
        if run.env is None:
            run.env = self._make_env(run)
        return run.env

    def _make_env(self, run: _Run) -> fhirpath.Env:
        return fhirpath.Env(
            resolve=lambda ref: self.resolve_reference(run, ref),
            member_of=self._member_of,
            conforms_to=lambda value, url: self.conforms(run, value, url),
        )


# ---------------------------------------------------------------------- native invariants


_REGEX_FUNCTIONS = frozenset({"matches", "matchesFull", "replaceMatches"})


def _literal_regexes(expression: str) -> list[str]:
    """The string literals an expression passes as the pattern of matches() and the like (vetted when the
    profile is written; patterns computed at run time are vetted when they run)."""
    try:
        toks = fastpath.tokenize(expression)
    except fastpath.Unsupported:
        return []
    return [fastpath.unescape(toks[i + 2][1][1:-1]) for i in range(len(toks) - 2)
            if toks[i][0] == "id" and toks[i][1] in _REGEX_FUNCTIONS and toks[i + 1] == ("op", "(")
            and toks[i + 2][0] == "str"]


def _n_ele1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    if isinstance(focus, dict):
        return any(k != "id" for k in focus)
    return focus is not None


def _n_ext1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    if not isinstance(focus, dict):
        return None
    has_ext = bool(focus.get("extension"))
    has_value = any(k.startswith("value") or k.startswith("_value") for k in focus)
    return has_ext != has_value


def _n_dom2(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return not any(isinstance(c, dict) and c.get("contained") for c in _arr(focus.get("contained")))


def _strings(obj: Any, out: set[str], skip: Any = None) -> None:
    if isinstance(obj, str):
        if obj.startswith("#"):
            out.add(obj)
    elif isinstance(obj, dict):
        for val in obj.values():
            if val is not skip:
                _strings(val, out, skip)
    elif isinstance(obj, list):
        for x in obj:
            _strings(x, out, skip)


def _n_dom3(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    contained = focus.get("contained")
    if not isinstance(contained, list) or not contained:
        return True
    refs: set[str] = set()
    _strings(focus, refs)
    if "#" in refs:
        return True
    for c in contained:
        if isinstance(c, dict) and c.get("id") and "#" + str(c["id"]) not in refs:
            run.add("error", "invariant", "invariant-dom-3",
                    f"{path}: contained resource '{c.get('id')}' is not referenced from the rest of the resource "
                    "(dom-3)", path + ".contained")
    return True


def _n_dom4(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    for c in _arr(focus.get("contained")):
        m = c.get("meta") if isinstance(c, dict) else None
        if isinstance(m, dict) and ("versionId" in m or "lastUpdated" in m):
            return False
    return True


def _n_dom5(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    for c in _arr(focus.get("contained")):
        m = c.get("meta") if isinstance(c, dict) else None
        if isinstance(m, dict) and m.get("security"):
            return False
    return True


def _n_dom6(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    t = focus.get("text")
    return isinstance(t, dict) and "div" in t


def _n_true(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return True  # checked natively elsewhere (narrative: in the primitive check of Narrative.div)


def _n_ref1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return True  # reference resolution reports '#id' problems with the exact reason


def _n_ref2(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return any(k in focus for k in ("reference", "identifier", "display", "extension", "_reference", "_display"))


def _n_cod1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return not ("code" not in focus and "display" in focus)


def _n_cpt2(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return "value" not in focus or "system" in focus


def _n_qty3(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return "code" not in focus or "system" in focus


def _n_ident1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return "value" in focus or "_value" in focus


def _n_att1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    return "data" not in focus or "contentType" in focus


def _n_per1(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
    s, e = focus.get("start"), focus.get("end")
    if not isinstance(s, str) or not isinstance(e, str):
        return True
    lo, hi = _instant_key(s), _instant_key(e, high=True)
    if lo is None or hi is None:
        return None
    return lo <= hi


def _instant_key(v: str, high: bool = False) -> int | None:
    """The earliest (``high``: latest) instant, µs, a date/dateTime can stand for: a partial date is its whole
    range; a value without a time zone may be in any zone, so it is widened by 14 hours either way."""
    from dhp.instants import DateError, date_range

    try:
        lo, hi = date_range(v)
    except DateError:
        return None
    zoned = "T" in v and (v.endswith("Z") or v[-6:-5] in ("+", "-"))
    widen = 0 if zoned else 14 * 3_600_000_000
    return hi + widen if high else lo - widen


def _entries(focus: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in _arr(focus.get("entry")) if isinstance(e, dict)]


def _n_bdl(key: str) -> Callable[[Validator, _Run, Any, str], bool | None]:
    def check(v: Validator, run: _Run, focus: Any, path: str) -> bool | None:
        t = focus.get("type")
        entries = _entries(focus)
        if key == "bdl-1":
            return "total" not in focus or t in ("searchset", "history")
        if key == "bdl-2":
            return t == "searchset" or all("search" not in e for e in entries)
        if key == "bdl-3a":
            return t not in ("document", "message", "searchset", "collection") or all(
                "resource" in e and "request" not in e and "response" not in e for e in entries)
        if key == "bdl-3b":
            return t != "history" or all(
                "request" in e and "response" in e and
                ((e.get("request") or {}).get("method") in ("POST", "PATCH", "PUT")) == ("resource" in e)
                for e in entries)
        if key == "bdl-3c":
            return t not in ("transaction", "batch") or all(
                isinstance(e.get("request"), dict) and "method" in e["request"] and
                (e["request"].get("method") in ("POST", "PATCH", "PUT")) == ("resource" in e)
                for e in entries)
        if key == "bdl-3d":
            return t not in ("transaction-response", "batch-response") or all("response" in e for e in entries)
        if key == "bdl-7":
            if t == "history":
                return True
            seen: set[tuple[str, str]] = set()
            for e in entries:
                fu = e.get("fullUrl")
                if not isinstance(fu, str):
                    continue
                r = e.get("resource") if isinstance(e.get("resource"), dict) else {}
                m = r.get("meta") if isinstance(r.get("meta"), dict) else {}
                k = (fu, str(m.get("versionId", "")))
                if k in seen:
                    return False
                seen.add(k)
            return True
        if key == "bdl-9":
            ident = focus.get("identifier") if isinstance(focus.get("identifier"), dict) else {}
            return t != "document" or ("system" in ident and "value" in ident)
        if key == "bdl-10":
            return t != "document" or isinstance(focus.get("timestamp"), str)
        first = (entries[0].get("resource") or {}) if entries else {}
        first_type = first.get("resourceType") if isinstance(first, dict) else None
        if key == "bdl-11":
            return t != "document" or first_type == "Composition"
        if key == "bdl-12":
            return t != "message" or first_type == "MessageHeader"
        if key == "bdl-13":
            return t != "subscription-notification" or first_type == "SubscriptionStatus"
        if key == "bdl-14":
            return t != "history" or all((e.get("request") or {}).get("method") != "PATCH" for e in entries)
        if key == "bdl-15":
            return t in ("transaction", "transaction-response", "batch", "batch-response") or all(
                "fullUrl" in e or (e.get("request") or {}).get("method") == "POST" for e in entries)
        if key == "bdl-16":
            iss = focus.get("issues")
            if not isinstance(iss, dict):
                return True
            return all(not isinstance(i, dict) or i.get("severity") in ("information", "warning")
                       for i in _arr(iss.get("issue")))
        if key == "bdl-17":
            return t != "document" or "issues" not in focus
        if key == "bdl-18":
            return t != "searchset" or any(
                isinstance(lk, dict) and lk.get("relation") == "self" and lk.get("url")
                for lk in _arr(focus.get("link")))
        if key == "bdl-5":
            return any(k in focus for k in ("resource", "request", "response"))
        if key == "bdl-8":
            fu = focus.get("fullUrl")
            return not isinstance(fu, str) or "/_history/" not in fu
        return None
    return check


_BUILTIN_KEYS = frozenset({"ele-1", "txt-1", "txt-2", "ref-1"})

NATIVE: dict[str, Callable[[Validator, _Run, Any, str], bool | None]] = {
    "ele-1": _n_ele1, "ext-1": _n_ext1, "dom-2": _n_dom2, "dom-3": _n_dom3, "dom-4": _n_dom4,
    "dom-5": _n_dom5, "dom-6": _n_dom6, "txt-1": _n_true, "txt-2": _n_true, "ref-1": _n_ref1,
    "ref-2": _n_ref2, "cod-1": _n_cod1, "cpt-2": _n_cpt2, "qty-3": _n_qty3, "ident-1": _n_ident1,
    "att-1": _n_att1, "per-1": _n_per1,
}
for _k in ("bdl-1", "bdl-2", "bdl-3a", "bdl-3b", "bdl-3c", "bdl-3d", "bdl-5", "bdl-7", "bdl-8", "bdl-9",
           "bdl-10", "bdl-11", "bdl-12", "bdl-13", "bdl-14", "bdl-15", "bdl-16", "bdl-17", "bdl-18"):
    NATIVE[_k] = _n_bdl(_k)


# ---------------------------------------------------------------------- helpers

class _Missing:
    __slots__ = ()


_EMPTY: dict[str, Any] = {}

# (type, string value) → format problem or None; values such as system URIs repeat across resources.
_PRIM_CACHE: dict[tuple[str, str], str | None] = {}


_MISSING: Any = _Missing()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _jtype(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | Decimal):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if v is None:
        return "null"
    return "an object"


def _where(run: _Run, elem: Elem | None) -> str:
    prof = run.profile
    if elem is not None and elem.plan.url != prof and elem.plan.derivation == "constraint":
        return f"profile {prof}, via {elem.plan.url}"
    return f"profile {prof}" if prof else "base specification"


def _short(v: Any) -> str:
    from dhp import fhirjson

    try:
        s = fhirjson.dumps(v).decode()
    except TypeError:
        s = repr(v)
    return s if len(s) <= 200 else s[:197] + "..."


def _num(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float | Decimal):
        return Decimal(str(v))
    return v


def _equal(a: Any, b: Any) -> bool:
    if type(a) is str:  # the common case; a string never equals a number or a boolean here
        return a == b
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return False
        return all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return False
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return _num(a) == _num(b)


def _pattern(p: Any, v: Any) -> bool:
    if type(p) is str:
        return p == v
    if isinstance(p, dict):
        if not isinstance(v, dict):
            return False
        return all(k in v and _pattern(pv, v[k]) for k, pv in p.items())
    if isinstance(p, list):
        if not isinstance(v, list):
            return False
        return all(any(_pattern(px, vx) for vx in v) for px in p)
    if isinstance(p, bool) or isinstance(v, bool):
        return p is v
    return _num(p) == _num(v)


def _arr(x: Any) -> list[Any]:
    """A JSON array property as a list; anything else (null, object, scalar) as empty. The wrong JSON type is
    reported by the structural pass, so helpers that only look for values must not iterate it."""
    return x if isinstance(x, list) else []


def _has_dar(obj: Any) -> bool:
    return isinstance(obj, dict) and any(
        isinstance(x, dict) and x.get("url") == DAR_URL for x in _arr(obj.get("extension")))


def _sd_is_modifier(sd: dict[str, Any]) -> bool | None:
    elems = (sd.get("snapshot") or {}).get("element") or []
    if elems:
        return bool(elems[0].get("isModifier"))
    return None


_TOKENS: dict[str, list[str]] = {}


def _tokens(path: str) -> list[str]:
    hit = _TOKENS.get(path)
    if hit is None:
        hit = _TOKENS[path] = _tokenize_path(path)
    return hit


def _tokenize_path(path: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(path):
        if path[pos] == ".":
            pos += 1
            continue
        m = _TOKEN_RE.match(path, pos)
        if not m:
            break
        out.append(m.group(0))
        pos = m.end()
    return out


def _path_values(v: Validator, run: _Run, value: Any, path: str) -> list[Any]:
    """Values a discriminator path selects in an instance item."""
    if isinstance(value, dict) and path in value:
        x = value[path]
        return x if isinstance(x, list) else [x]
    cur: list[Any] = [value]
    for tok in _tokens(path):
        if tok == "$this":
            continue
        nxt: list[Any] = []
        if tok == "resolve()":
            for x in cur:
                ref = x.get("reference") if isinstance(x, dict) else None
                if isinstance(ref, str):
                    t = v.resolve_reference(run, ref)
                    if t is not None:
                        nxt.append(t)
            cur = nxt
            continue
        if tok.startswith("extension("):
            url = tok[tok.index("(") + 2: -2]
            for x in cur:
                if isinstance(x, dict):
                    nxt += [e for e in _arr(x.get("extension")) if isinstance(e, dict) and e.get("url") == url]
            cur = nxt
            continue
        if tok.startswith("ofType(") or tok.startswith("as("):
            tname = tok[tok.index("(") + 1: -1]
            for x in cur:
                if isinstance(x, dict) and "resourceType" in x:
                    if x["resourceType"] == tname:
                        nxt.append(x)
                else:
                    nxt.append(x)
            cur = nxt
            continue
        for x in cur:
            if not isinstance(x, dict):
                continue
            if tok in x:
                val = x[tok]
            else:
                val = None
                for k in x:
                    if k.startswith(tok) and len(k) > len(tok) and k[len(tok)].isupper():
                        val = x[k]
                        break
            if val is None:
                continue
            if isinstance(val, list):
                nxt.extend(val)
            else:
                nxt.append(val)
        cur = nxt
    return cur
