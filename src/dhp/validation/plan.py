"""Compiled validation plans: a StructureDefinition snapshot turned once into a tree of element checks.

A :class:`Plan` holds the root :class:`Elem`; each Elem knows its cardinality, allowed types, fixed/pattern
value, binding, invariants, limits, its snapshot children and its slices. Children that the snapshot does not
list (``Patient.telecom`` is not expanded) come from the datatype's own plan at validation time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dhp.validation.primitives import PRIMITIVES

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
BEST_PRACTICE_EXT = "http://hl7.org/fhir/StructureDefinition/elementdefinition-bestpractice"
BASE = "http://hl7.org/fhir/StructureDefinition/"

_SYSTEM_TYPES = {
    "http://hl7.org/fhirpath/System.String": "string", "http://hl7.org/fhirpath/System.Boolean": "boolean",
    "http://hl7.org/fhirpath/System.Integer": "integer", "http://hl7.org/fhirpath/System.Decimal": "decimal",
    "http://hl7.org/fhirpath/System.Date": "date", "http://hl7.org/fhirpath/System.DateTime": "dateTime",
    "http://hl7.org/fhirpath/System.Time": "time",
}


def type_code(t: dict[str, Any]) -> str:
    code = str(t.get("code", ""))
    for ext in t.get("extension") or ():
        if ext.get("url") == FHIR_TYPE_EXT and isinstance(ext.get("valueUrl") or ext.get("valueUri"), str):
            return str(ext.get("valueUrl") or ext.get("valueUri"))
    return _SYSTEM_TYPES.get(code, code)


def cap(code: str) -> str:
    return code[:1].upper() + code[1:]


@dataclass(frozen=True)
class TypeRef:
    code: str
    profiles: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    aggregation: tuple[str, ...] = ()


@dataclass
class Constraint:
    key: str
    severity: str  # error | warning
    human: str
    expression: str
    source: str
    # From a definition of an installed package (not written through the API): its regexes run unvetted.
    trusted: bool = False


@dataclass
class Discriminator:
    type: str  # value | pattern | exists | type | profile | position
    path: str


@dataclass
class Slicing:
    discriminators: list[Discriminator]
    rules: str  # closed | open | openAtEnd
    ordered: bool


_MAX_MANY = 1 << 30


class PlanError(ValueError):
    """A snapshot element that cannot be compiled (a property of the wrong JSON type, …): the profile is
    unusable, and validation against it reports that instead of crashing."""


def _check(ed: Any, where: str) -> None:
    """Refuse JSON types the compiler and validator rely on (only reachable when the StructureDefinition was
    stored without validation): a clear error instead of an AttributeError at validation time."""
    if not isinstance(ed, dict):
        raise PlanError(f"{where}: an element definition must be a JSON object")
    eid = ed.get("id") if isinstance(ed.get("id"), str) else where
    if not isinstance(ed.get("path"), str) or not ed["path"]:
        raise PlanError(f"{eid}: path must be a non-empty string")
    if ed.get("id") is not None and not isinstance(ed["id"], str):
        raise PlanError(f"{eid}: id must be a string")
    for k in ("min", "maxLength"):
        if ed.get(k) is not None and (type(ed[k]) is not int or ed[k] < 0):
            raise PlanError(f"{eid}: {k} must be a non-negative integer")
    m = ed.get("max")
    if m is not None and not (isinstance(m, str) and (m == "*" or (m.isascii() and m.isdigit()))):
        raise PlanError(f"{eid}: max must be '*' or a non-negative integer as a string")
    for k in ("sliceName", "contentReference"):
        if ed.get(k) is not None and not isinstance(ed[k], str):
            raise PlanError(f"{eid}: {k} must be a string")
    for k in ("base", "binding", "slicing"):
        if ed.get(k) is not None and not isinstance(ed[k], dict):
            raise PlanError(f"{eid}: {k} must be a JSON object")
    base = ed.get("base") or {}
    if not isinstance(base.get("path", ""), str) or not isinstance(base.get("max", ""), str):
        raise PlanError(f"{eid}: base.path and base.max must be strings")
    b = ed.get("binding") or {}
    for k in ("strength", "valueSet"):
        if b.get(k) is not None and not isinstance(b[k], str):
            raise PlanError(f"{eid}: binding.{k} must be a string")
    for k in ("type", "constraint"):
        v = ed.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
            raise PlanError(f"{eid}: {k} must be an array of JSON objects")
    for t in ed.get("type") or ():
        if not isinstance(t.get("code", ""), str):
            raise PlanError(f"{eid}: type.code must be a string")
        for k in ("profile", "targetProfile", "aggregation", "extension"):
            v = t.get(k)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str if k != "extension" else dict)
                                                                  for x in v)):
                raise PlanError(f"{eid}: type.{k} must be an array")
    for c in ed.get("constraint") or ():
        for k in ("key", "severity", "human", "expression", "source"):
            if c.get(k) is not None and not isinstance(c[k], str):
                raise PlanError(f"{eid}: constraint.{k} must be a string")
        if not ((isinstance(c.get("extension"), list) and all(isinstance(x, dict) for x in c["extension"]))
                or c.get("extension") is None):
            raise PlanError(f"{eid}: constraint.extension must be an array of JSON objects")
    s = ed.get("slicing") or {}
    d = s.get("discriminator")
    if d is not None and not (isinstance(d, list) and all(
            isinstance(x, dict) and isinstance(x.get("type", ""), str) and isinstance(x.get("path", ""), str)
            for x in d)):
        raise PlanError(f"{eid}: slicing.discriminator must be an array of objects with string type and path")
    if not isinstance(s.get("rules", ""), str):
        raise PlanError(f"{eid}: slicing.rules must be a string")


def _max(v: Any) -> int:
    if v in (None, "*"):
        return _MAX_MANY
    try:
        return int(v)
    except (TypeError, ValueError):
        return _MAX_MANY


class Elem:
    """One ElementDefinition of a snapshot, compiled."""

    __slots__ = (
        "_eff", "base_path", "binding", "choice", "constraints", "content_ref", "fast1", "fast_prim", "fixed", "id",
        "is_modifier", "keymap", "many", "max", "max_length", "max_value", "memo1", "min", "min_value",
        "must_support", "name", "path", "pattern", "plain", "plan", "slice_name", "slices", "slicing", "sub",
        "type_codes", "types",
    )

    def __init__(self, ed: dict[str, Any], plan: Plan) -> None:
        _check(ed, plan.url)
        self.plan = plan
        self.id: str = ed.get("id") or ed["path"]
        self.path: str = ed["path"]
        last = self.path.rsplit(".", 1)[-1]
        self.choice = last.endswith("[x]")
        self.name = last[:-3] if self.choice else last
        self.min = int(ed.get("min") or 0)
        self.max = _max(ed.get("max"))
        base = ed.get("base") or {}
        self.base_path: str = base.get("path") or self.path
        # JSON arrays follow the base definition's cardinality, not a profile's narrowing of it.
        self.many = _max(base.get("max", ed.get("max"))) > 1
        self.types: list[TypeRef] = []
        for t in ed.get("type") or ():
            self.types.append(TypeRef(type_code(t), tuple(t.get("profile") or ()),
                                      tuple(t.get("targetProfile") or ()), tuple(t.get("aggregation") or ())))
        self.type_codes = frozenset(t.code for t in self.types)
        self.fixed: Any = None
        self.pattern: Any = None
        self.min_value: Any = None
        self.max_value: Any = None
        for k, v in ed.items():
            if k.startswith("fixed"):
                self.fixed = v
            elif k.startswith("pattern"):
                self.pattern = v
            elif k.startswith("minValue"):
                self.min_value = v
            elif k.startswith("maxValue"):
                self.max_value = v
        b = ed.get("binding") or {}
        self.binding: tuple[str, str] | None = (
            (b["strength"], b["valueSet"]) if b.get("valueSet") and b.get("strength") else None)
        self.constraints: list[Constraint] = []
        for c in ed.get("constraint") or ():
            if not c.get("key"):
                continue
            sev = c.get("severity", "error")
            if any(e.get("url") == BEST_PRACTICE_EXT and e.get("valueBoolean") for e in c.get("extension") or ()):
                sev = "warning"
            self.constraints.append(Constraint(c["key"], sev, c.get("human", ""), c.get("expression") or "",
                                               c.get("source", "")))
        self.max_length: int | None = ed.get("maxLength") if isinstance(ed.get("maxLength"), int) else None
        self.must_support = bool(ed.get("mustSupport"))
        self.is_modifier = bool(ed.get("isModifier"))
        self.content_ref: str | None = ed.get("contentReference")
        s = ed.get("slicing")
        self.slicing: Slicing | None = None
        if s:
            self.slicing = Slicing([Discriminator(d.get("type", "value"), d.get("path", "$this"))
                                    for d in s.get("discriminator") or ()],
                                   s.get("rules", "open"), bool(s.get("ordered")))
        self.slice_name: str | None = ed.get("sliceName")
        self.sub: dict[str, Elem] = {}  # snapshot children by element name (no [x])
        self.slices: list[Elem] = []
        self.keymap: dict[str, tuple[Elem, str | None]] | None = None
        self._eff: dict[str, Any] = {}  # per-type effective checks, filled by the validator
        # Nothing beyond the type's own format rule to check on a value of this element.
        self.plain = (self.fixed is None and self.pattern is None and self.max_length is None
                      and self.min_value is None and self.max_value is None
                      and (self.binding is None or self.binding[0] not in ("required", "extensible"))
                      and all(c.key in ("ele-1",) for c in self.constraints))
        # A single-typed primitive child whose string values need only the type's format rule: the walker
        # checks such values inline (no item list, no per-value calls). Slices attach later (compile_plan).
        t = self.single_type()
        simple = (not self.choice and t in PRIMITIVES and t != "xhtml" and self.slicing is None
                  and not (t == "id" and self.name == "id") and not self.content_ref)
        self.fast_prim: str | None = t if simple and self.plain else None
        single = not self.many and self.min <= 1 <= self.max
        # ... and one such value alone satisfies the cardinality.
        self.fast1: str | None = self.fast_prim if single else None
        # A single primitive whose checks (format, fixed/pattern, limits, binding) depend on the value alone:
        # the validator remembers (element, value) pairs that passed them all.
        self.memo1 = bool(simple and single and self.fast_prim is None
                          and all(c.key == "ele-1" for c in self.constraints))

    def single_type(self) -> str | None:
        return self.types[0].code if len(self.types) == 1 else None

    def build_keymap(self) -> dict[str, tuple[Elem, str | None]]:
        """JSON property name → (child element, type code) for this element's snapshot children."""
        km: dict[str, tuple[Elem, str | None]] = {}
        for child in self.sub.values():
            if child.choice:
                for t in child.types:
                    km[child.name + cap(t.code)] = (child, t.code)
            else:
                km[child.name] = (child, child.single_type())
        self.keymap = km
        return km

    def __repr__(self) -> str:
        return f"Elem({self.id})"


@dataclass
class Plan:
    url: str
    version: str
    type: str
    kind: str
    derivation: str
    sd: dict[str, Any]
    root: Elem = field(init=False)
    by_id: dict[str, Elem] = field(default_factory=dict)
    by_path: dict[str, Elem] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.url}|{self.version}"

    @property
    def title(self) -> str:
        return str(self.sd.get("name") or self.sd.get("id") or self.url)


def _split_id(eid: str) -> tuple[str, str]:
    parent, _, last = eid.rpartition(".")
    return parent, last


def compile_plan(sd: dict[str, Any]) -> Plan:
    """Build the element tree from ``sd['snapshot']`` (the caller makes sure there is one)."""
    snap = sd.get("snapshot")
    elements = (snap.get("element") if isinstance(snap, dict) else None) or []
    if not isinstance(elements, list) or not elements:
        raise PlanError(f"StructureDefinition {sd.get('url')} has no snapshot")
    plan = Plan(str(sd.get("url", "")), str(sd.get("version", "")), str(sd.get("type", "")),
                str(sd.get("kind", "")), str(sd.get("derivation", "")), sd)
    root = Elem(elements[0], plan)
    if plan.derivation == "constraint" and "/" not in plan.type and root.path != plan.type:
        # A Patient profile whose snapshot describes an Observation would check Patients against the wrong model.
        raise PlanError(f"the snapshot describes {root.path}, not the profiled type {plan.type} "
                        "(does baseDefinition define that type?)")
    plan.root = root
    plan.by_id[root.id] = root
    plan.by_path.setdefault(root.path, root)
    for ed in elements[1:]:
        el = Elem(ed, plan)
        parent_id, last = _split_id(el.id)
        parent = plan.by_id.get(parent_id)
        if parent is None:
            # Ids without slice parts (old snapshots): fall back to the path.
            parent = plan.by_path.get(el.path.rpartition(".")[0])
            if parent is None:
                continue
        name, _, slice_part = last.partition(":")
        if slice_part:
            base_name = name[:-3] if name.endswith("[x]") else name
            # Re-slices (a/b) hang off the same sliced element.
            base = parent.sub.get(base_name)
            if base is None:
                continue
            base.slices.append(el)
        elif el.slice_name and parent.sub.get(el.name) is not None and ":" not in el.id:
            parent.sub[el.name].slices.append(el)
        else:
            parent.sub[el.name] = el
            plan.by_path.setdefault(el.path, el)
        plan.by_id[el.id] = el
    return plan


def build_plan(sd: dict[str, Any], registry: Any) -> Plan:
    """The plan of ``sd``, its snapshot generated first when it has none; raises (``PlanError``,
    ``SnapshotError``, …) when the definition cannot be used."""
    snap = sd.get("snapshot")
    if not (isinstance(snap, dict) and snap.get("element")):
        from dhp.validation.snapshot import generate_snapshot

        sd = generate_snapshot(sd, registry)
    return compile_plan(sd)
