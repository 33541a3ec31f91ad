"""Index values out of resources, with each SearchParameter's FHIRPath expression compiled once.

Most R5 expressions are plain paths (``Patient.name``, ``Observation.value.ofType(Quantity)``,
``Observation.subject.where(resolve() is Patient)``): those run as a tiny native walker over the JSON,
without the FHIRPath interpreter. Everything else goes through fhirpathpy, compiled once per
(resource type, parameter).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from dhp.instants import MAX_US, MIN_US, DateError, date_range
from dhp.search.params import ParamDef
from dhp.search.values import NUMBER_TYPES, norm, to_float

log = logging.getLogger("dhp.search")

Evaluator = Callable[[Any], list[Any]]

# Choice-type suffixes as they appear in JSON property names (value[x] → valueQuantity, …).
_CHOICE_SUFFIXES = (
    "Boolean", "Integer", "Integer64", "Decimal", "String", "Uri", "Url", "Canonical", "Code", "Oid", "Id",
    "Uuid", "Markdown", "Base64Binary", "Instant", "Date", "DateTime", "Time", "PositiveInt", "UnsignedInt",
    "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "CodeableReference", "Coding",
    "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier", "Money", "Period", "Quantity",
    "Range", "Ratio", "RatioRange", "Reference", "SampledData", "Signature", "Timing", "ContactDetail",
    "DataRequirement", "Expression", "ParameterDefinition", "RelatedArtifact", "TriggerDefinition",
    "UsageContext", "Availability", "ExtendedContactDetail", "Dosage", "Meta",
)
_SUFFIX_SET = frozenset(_CHOICE_SUFFIXES)
_PRIMITIVE_TYPES = {"boolean", "integer", "integer64", "decimal", "string", "uri", "url", "canonical", "code",
                    "oid", "id", "uuid", "markdown", "base64Binary", "instant", "date", "dateTime", "time",
                    "positiveInt", "unsignedInt"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OFTYPE = re.compile(r"^(?:ofType|as)\((?:FHIR\.)?([A-Za-z]+)\)$")
_WHEREREF = re.compile(r"^where\(resolve\(\)\s+is\s+([A-Za-z]+)\)$")
_EXT = re.compile(r"^extension\('([^']+)'\)$")
_WHERE_EQ = re.compile(r"^where\(([A-Za-z]+)\s*=\s*'([^']*)'\)$")
_AS_SUFFIX = re.compile(r"^(.*)\s+as\s+(?:FHIR\.)?([A-Za-z]+)$", re.S)


def split_top(expr: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    out, depth, cur, quote = [], 0, [], False
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch == "'" and (i == 0 or expr[i - 1] != "\\"):
            quote = not quote
        elif not quote:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif depth == 0 and expr.startswith(sep, i):
                out.append("".join(cur))
                cur = []
                i += len(sep)
                continue
        cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _strip_parens(s: str) -> str:
    s = s.strip()
    while s.startswith("(") and s.endswith(")") and len(split_top(s[1:-1], ")")) == 1 \
            and s[1:-1].count("(") == s[1:-1].count(")"):
        s = s[1:-1].strip()
    return s


def _compile_native(part: str, rtype: str | None, type_names: frozenset[str]) -> list[tuple[str, str]] | None:
    """Steps for a plain path, or None when the part needs the interpreter. [] means "not for this type"."""
    part = _strip_parens(part)
    m = _AS_SUFFIX.match(part)
    if m:
        part = f"{_strip_parens(m.group(1))}.ofType({m.group(2)})"
    segs = [s.strip() for s in split_top(part, ".")]
    if not segs or not segs[0]:
        return None
    steps: list[tuple[str, str]] = []
    first = segs[0]
    if rtype is not None and first[:1].isupper() and _IDENT.match(first):
        if first not in (rtype, "Resource", "DomainResource"):
            return [] if first in type_names else None
        segs = segs[1:]
    for s in segs:
        if _IDENT.match(s):
            steps.append(("child", s))
        elif (m := _OFTYPE.match(s)):
            t = m.group(1)
            if steps and steps[-1][0] == "child":
                steps[-1] = ("typed", steps[-1][1] + "|" + t)
            else:
                steps.append(("oftype", t))
        elif (m := _WHEREREF.match(s)):
            steps.append(("whereref", m.group(1)))
        elif s == "first()":
            steps.append(("first", ""))
        elif (m := _EXT.match(s)):
            steps.append(("ext", m.group(1)))
        elif (m := _WHERE_EQ.match(s)):
            steps.append(("where_eq", m.group(1) + "|" + m.group(2)))
        else:
            return None
    return steps or [("self", "")]


_STEMS: dict[str, str | None] = {}


def stem(key: str) -> str | None:
    """The element name of a choice-type property (``valueQuantity`` → ``value``), else None."""
    try:
        return _STEMS[key]
    except KeyError:
        pass
    got = None
    for i in range(1, len(key)):
        if key[i].isupper() and key[i:] in _SUFFIX_SET:
            got = key[:i]
            break
    if len(_STEMS) < 20_000:  # property names come from clients: keep the cache bounded
        _STEMS[key] = got
    return got


# Tuples, not ``dict | list``: a union in an isinstance call is built anew on every call.
_CONTAINERS = (dict, list)


def _choice_names() -> frozenset[str]:
    from fhirpathpy.models import models

    return frozenset(path.rsplit(".", 1)[-1] for path in models["r5"]["choiceTypePaths"])


#: Names of FHIR R5's choice elements (``value`` of ``value[x]``, ``onset``, ``deceased`` …). Profiles only
#: constrain elements, so no package adds one. An absent element whose name is not among them cannot be
#: there under a typed name either: :func:`_child` then skips the search through the node's keys.
CHOICE_NAMES = _choice_names()


def _shape_is(v: Any, t: str) -> bool:
    if t in _PRIMITIVE_TYPES:
        return not isinstance(v, _CONTAINERS)
    return isinstance(v, dict)


def _typed_key(name: str, typ: str) -> str:
    """The JSON property of ``name`` as type ``typ`` (``value`` as Quantity: ``valueQuantity``)."""
    return name + typ[0].upper() + typ[1:]


def _child(nodes: list[Any], name: str, typ: str | None, key: str | None = None) -> list[Any]:
    """``name`` of each node; with ``typ`` (and its ``key``, :func:`_typed_key`), only values of that type."""
    out: list[Any] = []
    for n in nodes:
        if not isinstance(n, dict):
            continue
        if typ is not None:
            v = n.get(key or _typed_key(name, typ))
            if v is None:
                v = n.get(name)
                if v is not None and not (isinstance(v, list) or _shape_is(v, typ)):
                    v = None
        else:
            v = n.get(name)
            if v is None and name in CHOICE_NAMES:  # a choice element: valueQuantity for "value"
                for k in n:
                    if stem(k) == name:
                        v = n[k]
                        break
        if v is None:
            continue
        if isinstance(v, list):
            out.extend(v if None not in v else [x for x in v if x is not None])
        else:
            out.append(v)
    return out


def _ref_is(v: Any, t: str) -> bool:
    """``where(resolve() is T)``: the reference's target type, read as :func:`reference_rows` reads it (so
    ``patient`` is exactly ``subject``'s rows that point at a Patient)."""
    if not isinstance(v, dict):
        return False
    ref = v.get("reference")
    if isinstance(ref, dict):  # CodeableReference
        return _ref_is(ref, t)
    if isinstance(ref, str) and ref and not ref.startswith("#"):
        parts = ref.split("/")
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        return len(parts) >= 2 and parts[-2] == t and bool(parts[-1])
    return v.get("type") == t and _k((v.get("identifier") or {}).get("value")
                                     if isinstance(v.get("identifier"), dict) else None) is not None


def _prepared(parts: list[list[tuple[str, str]]]) -> list[list[tuple[str, Any]]]:
    """Steps for :func:`_run_native`: a typed step's name, JSON property and type worked out in advance."""
    out = []
    for steps in parts:
        prepared: list[tuple[str, Any]] = []
        for kind, arg in steps:
            if kind == "typed":
                name, _, t = arg.partition("|")
                prepared.append((kind, (name, _typed_key(name, t), t)))
            else:
                prepared.append((kind, arg))
        out.append(prepared)
    return out


def _run_native(parts: list[list[tuple[str, Any]]], root: Any) -> list[Any]:
    """``parts`` made by :func:`_prepared`."""
    out: list[Any] = []
    for steps in parts:
        nodes = [root]
        for kind, arg in steps:
            if kind == "child":
                nodes = _child(nodes, arg, None)
            elif kind == "typed":
                name, key, t = arg
                nodes = _child(nodes, name, t, key)
            elif kind == "oftype":
                nodes = [n for n in nodes if _shape_is(n, arg)]
            elif kind == "whereref":
                nodes = [n for n in nodes if _ref_is(n, arg)]
            elif kind == "first":
                nodes = nodes[:1]
            elif kind == "ext":
                nodes = [e for e in _child(nodes, "extension", None)
                         if isinstance(e, dict) and e.get("url") == arg]
            elif kind == "where_eq":
                k, _, lit = arg.partition("|")
                nodes = [n for n in nodes if isinstance(n, dict) and n.get(k) == lit]
            if not nodes:
                break
        out.extend(nodes)
    return out


_EXISTS_NOT_FALSE = re.compile(r"^([A-Za-z.]+)\.exists\(\) and ([A-Za-z.]+) != false$")
_RESOLVE_IS = re.compile(r"where\(resolve\(\)\s+is\s+([A-Za-z]+)\)")


def _fhirpath(expr: str) -> Evaluator:
    import fhirpathpy
    from fhirpathpy.models import models

    # fhirpathpy has no resolve(): "is this reference to a Patient" is a question about the reference text.
    expr = _RESOLVE_IS.sub(lambda m: f"where(reference.startsWith('{m.group(1)}/') or "
                                     f"reference.contains('/{m.group(1)}/'))", expr)
    fn = fhirpathpy.compile(expr, models["r5"])

    def run(resource: Any) -> list[Any]:
        try:
            return [v for v in fn(resource) if v is not None]
        except Exception as e:  # a broken expression must not break the write
            log.warning("search expression %r failed: %s", expr, e)
            return []

    return run


def _plain_path(names: list[str]) -> Callable[[Any], list[Any]]:
    """``A.b.c`` without filters or types — most parameters — as one function: what :func:`_run_native`
    does for it, without its per-step dispatch. Its ``path`` lets :mod:`dhp.search.compiled` walk one or two
    steps inline."""
    first, rest = names[0], names[1:]

    def run(r: Any) -> list[Any]:
        v = r.get(first) if isinstance(r, dict) else None
        if v is None:
            nodes = _child([r], first, None)  # a choice element (valueQuantity for "value"), or nothing
        elif isinstance(v, list):
            nodes = v[:] if None not in v else [x for x in v if x is not None]
        else:
            nodes = [v]
        for name in rest:
            if not nodes:
                break
            nodes = _child(nodes, name, None)
        return nodes

    run.path = tuple(names)  # type: ignore[attr-defined]
    return run


def _probes(firsts: list[tuple[str, str]]) -> tuple[frozenset[str], frozenset[str]]:
    """(stems, keys): the expression finds something only if the resource has one of ``stems`` among its
    element names with choice suffixes removed, or one of ``keys`` among its JSON property names.

    A typed first step (``value.ofType(CodeableConcept)``) reads ``valueCodeableConcept`` or a plain
    ``value``, so an Observation with a ``valueQuantity`` is not a candidate for it.
    """
    stem_set: set[str] = set()
    key_set: set[str] = set()
    for kind, arg in firsts:
        name, _, t = arg.partition("|")
        if kind == "typed":
            key_set.update((name + t[0].upper() + t[1:], name))
        elif kind == "ext":  # extension('url') reads the resource's own extension list
            key_set.add("extension")
        else:
            stem_set.add(name)
    return frozenset(stem_set), frozenset(key_set)


def compile_expression(expr: str, rtype: str | None, type_names: frozenset[str]) -> Evaluator | None:
    """An evaluator for ``expr`` on resources of ``rtype`` (None: relative to any node)."""
    if not expr.strip():
        return None
    m = _EXISTS_NOT_FALSE.match(expr.strip())
    if m:
        # "X.exists() and X != false" (Patient.deceased): true when X is there and is not false.
        inner = compile_expression(m.group(1), rtype, type_names)
        if inner is None:
            return None

        def present(r: Any) -> list[Any]:
            return [True] if any(v is not False for v in inner(r)) else []

        if hasattr(inner, "probes"):  # it finds nothing where X cannot be
            present.probes = inner.probes  # type: ignore[attr-defined]
        return present
    parts = split_top(expr, "|")
    native: list[list[tuple[str, str]]] = []
    interpreted: list[str] = []
    for p in parts:
        steps = _compile_native(p, rtype, type_names)
        if steps is None:
            first = _strip_parens(p).split(".", 1)[0].strip("( ")
            if rtype is not None and first not in (rtype, "Resource", "DomainResource") and (
                    first in type_names or len(parts) > 1):
                continue  # another type's part of a shared expression
            interpreted.append(p.strip())
        elif steps:
            native.append(steps)
    if not native and not interpreted:
        return None
    interp = _fhirpath(" | ".join(interpreted)) if interpreted else None
    if interp is None:
        run = _plain_path([a for _k, a in native[0]]) if len(native) == 1 and all(
            k == "child" for k, _a in native[0]) else None
        if run is None:
            prepared = _prepared(native)

            def run(r: Any) -> list[Any]:
                return _run_native(prepared, r)

        firsts = [steps[0] for steps in native]
        if native == [[("self", "")]]:
            run.is_self = True  # type: ignore[attr-defined]
        if len(native) == 1 and len(native[0]) == 1 and native[0][0][0] in ("child", "typed"):
            run.single_element = native[0][0][1].split("|", 1)[0]  # type: ignore[attr-defined]
        if all(k in ("child", "typed", "ext") for k, _a in firsts):
            # Which top-level elements the expression can touch: lets indexing skip absent ones cheaply.
            run.probes = _probes(firsts)  # type: ignore[attr-defined]
        #: Same steps, same values: parameters sharing an expression share its evaluation on a resource.
        run.steps = tuple(tuple(s) for s in native)  # type: ignore[attr-defined]
        return run
    if not native:
        return interp
    prepared = _prepared(native)
    return lambda r: _run_native(prepared, r) + interp(r)


# ---------------------------------------------------------------- values → index rows

STR_LEN = 255
EXACT_LEN = 1000
KEY_LEN = 512
INF = 1e308


def _str(s: Any) -> list[tuple[str, str]]:
    return [(norm(s)[:STR_LEN], s[:EXACT_LEN])] if isinstance(s, str) and s else []


def string_rows(values: list[Any], skip: frozenset[str] = frozenset()) -> list[tuple[Any, ...]]:
    """``skip``: HumanName/Address parts other parameters index (see ``dhp.search.shared``)."""
    if len(values) == 1 and values[0].__class__ is str:  # most parameters: one plain string, as below
        s = values[0]
        return [(norm(s)[:STR_LEN], s[:EXACT_LEN])] if s else []
    out: list[tuple[Any, ...]] = []
    for v in values:
        if isinstance(v, str):
            out += _str(v)
        elif isinstance(v, dict):
            if "family" in v or "given" in v or ("text" in v and "line" not in v and "city" not in v):
                keys: tuple[str, ...] = ("family", "given", "prefix", "suffix", "text")
            elif "line" in v or "city" in v or "country" in v or "postalCode" in v or "district" in v:
                keys = ("line", "city", "district", "state", "postalCode", "country", "text")
            else:
                keys = tuple(k for k, x in v.items() if isinstance(x, str) and k not in ("id", "url"))
            for k in keys:
                if k in skip:
                    continue
                x = v.get(k)
                if x is None:
                    continue
                for s in x if isinstance(x, list) else (x,):
                    if isinstance(s, str) and s:
                        out.append((norm(s)[:STR_LEN], s[:EXACT_LEN]))
    return out if len(out) < 2 else list(dict.fromkeys(out))


def _k(s: Any) -> str | None:
    return s[:KEY_LEN] if isinstance(s, str) and s else None


def _display(s: Any) -> str | None:
    return norm(s)[:STR_LEN] if isinstance(s, str) and s else None


def token_rows(values: list[Any]) -> list[tuple[Any, ...]]:
    """(system, code, text, type-system, type-code)."""
    if len(values) == 1:  # most parameters: one code or flag, as below
        v = values[0]
        if v.__class__ is str:
            return [(None, v[:KEY_LEN], None, None, None)] if v else []
        if v.__class__ is bool:
            return [(None, "true" if v else "false", None, None, None)]
    out: list[tuple[Any, ...]] = []
    for v in values:
        if isinstance(v, bool):
            out.append((None, "true" if v else "false", None, None, None))
        elif isinstance(v, str):
            out.append((None, _k(v), None, None, None))
        elif isinstance(v, NUMBER_TYPES):
            out.append((None, str(v), None, None, None))
        elif isinstance(v, dict):
            if "concept" in v and isinstance(v["concept"], dict):  # CodeableReference
                out += token_rows([v["concept"]])
            elif "coding" in v or ("text" in v and "value" not in v and "code" not in v):
                text = _display(v.get("text"))
                for c in v.get("coding") or []:
                    if not isinstance(c, dict):
                        continue
                    code, d = c.get("code"), c.get("display")
                    if code or d:
                        sy = c.get("system")  # _k and _display inlined: codings are most of the index rows
                        out.append((sy[:KEY_LEN] if isinstance(sy, str) and sy else None,
                                    code[:KEY_LEN] if isinstance(code, str) and code else None,
                                    (norm(d)[:STR_LEN] if isinstance(d, str) and d else None) or text, None, None))
                if text:
                    out.append((None, None, text, None, None))
            elif "value" in v and isinstance(v.get("value"), str):  # Identifier or ContactPoint
                t = v.get("type")
                text = _display(t.get("text")) if isinstance(t, dict) else None
                types = [c for c in (t.get("coding") or []) if isinstance(c, dict)] if isinstance(t, dict) else []
                sysv = v.get("system")
                if sysv in ("phone", "fax", "email", "pager", "url", "sms", "other"):
                    sysv = None  # a ContactPoint: its "system" is a kind, not a namespace
                if types:
                    for c in types:
                        out.append((_k(sysv), _k(v["value"]), text, _k(c.get("system")), _k(c.get("code"))))
                else:
                    out.append((_k(sysv), _k(v["value"]), text, None, None))
            elif "code" in v:  # Coding (or a Quantity's code)
                out.append((_k(v.get("system")), _k(v.get("code")), _display(v.get("display")), None, None))
    if len(out) == 1:
        r = out[0]
        return out if r[1] is not None or r[2] is not None else []
    return [r for r in dict.fromkeys(out) if r[1] is not None or r[2] is not None]


def split_reference(ref: str, type_names: frozenset[str]) -> tuple[str | None, str | None]:
    """(type, id) of a literal reference ``Type/id``, ``Type/id/_history/n`` or ``http://…/Type/id``."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] in type_names and parts[-1]:
        return parts[-2], parts[-1][:64]
    return None, None


def reference_rows(values: Iterable[Any], type_names: frozenset[str]) -> list[tuple[Any, ...]]:
    """(target type, target id, url, version, identifier system, identifier value)."""
    out: list[tuple[Any, ...]] = []
    for v in values:
        if isinstance(v, str):  # canonical / uri
            url, _, ver = v.partition("|")
            out.append((None, None, _k(url), _k(ver) if ver else None, None, None))
        elif isinstance(v, dict):
            if isinstance(v.get("reference"), dict):  # CodeableReference
                out += reference_rows([v["reference"]], type_names)
                continue
            ref = v.get("reference")
            ident = v.get("identifier")
            if isinstance(ident, dict):
                isys, ival = _k(ident.get("system")), _k(ident.get("value"))
            else:
                isys = ival = None
            if isinstance(ref, str) and ref and not ref.startswith("#"):
                t, i = split_reference(ref, type_names)
                absolute = "://" in ref or ref.startswith("urn:")
                out.append((t, i, _k(ref) if absolute or t is None else None, None, isys, ival))
            elif ival:
                # A logical reference: its declared type is its target type (``resolve() is T`` reads it).
                t = v.get("type") if v.get("type") in type_names else None
                out.append((t, None, None, None, isys, ival))
    return out if len(out) < 2 else list(dict.fromkeys(out))


def _date_pair(v: Any) -> list[tuple[int, int]]:
    if isinstance(v, str):
        try:
            return [date_range(v)]
        except DateError:
            return []
    if isinstance(v, dict):
        if "start" in v or "end" in v:
            lo = _date_pair(v["start"])[0][0] if _date_pair(v.get("start")) else MIN_US
            hi = _date_pair(v["end"])[0][1] if _date_pair(v.get("end")) else MAX_US
            return [(lo, hi)]
        out = []
        for e in v.get("event") or []:  # Timing
            out += _date_pair(e)
        rep = v.get("repeat")
        if isinstance(rep, dict) and isinstance(rep.get("boundsPeriod"), dict):
            out += _date_pair(rep["boundsPeriod"])
        return out
    return []


def date_rows(values: list[Any]) -> list[tuple[Any, ...]]:
    if len(values) == 1 and values[0].__class__ is str:  # most parameters: one date, as below
        return _date_pair(values[0])
    out: list[tuple[Any, ...]] = []
    for v in values:
        out += _date_pair(v)
    return out if len(out) < 2 else list(dict.fromkeys(out))


def number_rows(values: Iterable[Any]) -> list[tuple[Any, ...]]:
    out = []
    for v in values:
        f = to_float(v.get("value") if isinstance(v, dict) else v)
        if f is not None:
            out.append((f, f))
    return out if len(out) < 2 else list(dict.fromkeys(out))


def quantity_rows(values: Iterable[Any]) -> list[tuple[Any, ...]]:
    """(low, high, system, code, unit)."""
    out: list[tuple[Any, ...]] = []
    for v in values:
        if not isinstance(v, dict):
            f = to_float(v)
            if f is not None:
                out.append((f, f, None, None, None))
            continue
        if "low" in v or "high" in v:  # Range
            lo, hi = v.get("low") or {}, v.get("high") or {}
            ref = lo or hi
            flo, fhi = to_float(lo.get("value")), to_float(hi.get("value"))
            out.append((-INF if flo is None else flo, INF if fhi is None else fhi, _k(ref.get("system")),
                        _k(ref.get("code")), _k(ref.get("unit"))))
        elif "currency" in v:  # Money
            f = to_float(v.get("value"))
            if f is not None:
                out.append((f, f, "urn:iso:std:iso:4217", _k(v.get("currency")), _k(v.get("currency"))))
        else:
            f = to_float(v.get("value"))
            if f is not None:
                out.append((f, f, _k(v.get("system")), _k(v.get("code")), _k(v.get("unit"))))
    return out if len(out) < 2 else list(dict.fromkeys(out))


def uri_rows(values: list[Any]) -> list[tuple[Any, ...]]:
    if len(values) == 1 and values[0].__class__ is str:  # one uri, as below
        return [(values[0][:KEY_LEN],)] if values[0] else []
    return list(dict.fromkeys((v[:KEY_LEN],) for v in values if isinstance(v, str) and v))


def near_rows(values: Iterable[Any]) -> list[tuple[Any, ...]]:
    out = []
    for v in values:
        if isinstance(v, dict):
            lat, lon = to_float(v.get("latitude")), to_float(v.get("longitude"))
            if lat is not None and lon is not None:
                out.append((lat, lon))
    return out


def component_cells(ptype: str, values: list[Any], type_names: frozenset[str]) -> list[tuple[Any, ...]]:
    """One composite component's values as (s, v, lo, hi) cells."""
    if ptype == "token":
        return [(s, c, None, None) for s, c, *_ in token_rows(values) if c is not None]
    if ptype == "quantity":
        # A search's ``||unit`` names the code or the human unit (as value-quantity's does): a unit that differs
        # from the code gets a cell of its own, without a system, so a system-qualified search skips it.
        out = []
        for lo, hi, s, c, u in quantity_rows(values):
            out.append((s, c, lo, hi))
            if u is not None and u != c:
                out.append((None, u, lo, hi))
        return out
    if ptype == "date":
        return [(None, None, float(lo), float(hi)) for lo, hi in date_rows(values)]
    if ptype == "number":
        return [(None, None, lo, hi) for lo, hi in number_rows(values)]
    if ptype == "string":
        return [(None, s, None, None) for s, _e in string_rows(values)]
    if ptype == "reference":
        return [(None, f"{t}/{i}" if t else u, None, None) for t, i, u, *_ in reference_rows(values, type_names)]
    if ptype == "uri":
        return [(None, u, None, None) for (u,) in uri_rows(values)]
    return []


_MEMO_KEYS: dict[tuple[Any, ...], int] = {}
_MEMO_IDS = itertools.count()  # next() is atomic: ids stay distinct if extractors are built on threads


class ParamExtractor:
    """Compiled extraction of one parameter on one resource type."""

    def __init__(self, param: ParamDef, rtype: str, type_names: frozenset[str],
                 skip: frozenset[str] = frozenset()) -> None:
        self.param = param
        #: HumanName/Address parts left to the parameters that index them (``dhp.search.shared``).
        self.skip = skip
        self.type_names = type_names
        self.root = compile_expression(param.expression, rtype, type_names)
        #: (stems, keys) the resource must have for the expression to find anything (None: cannot tell).
        self.probes: tuple[frozenset[str], frozenset[str]] | None = getattr(self.root, "probes", None)
        #: The top-level element a one-step path reads (Patient.birthDate → "birthDate"), else None.
        self.single_element: str | None = getattr(self.root, "single_element", None)
        # Bundle.composition / Bundle.message point at a resource inside the Bundle, not at a reference:
        # the embedded resource's own parameters are indexed under "code.param" on the Bundle. Other paths
        # ending in ``resource`` (RelatedArtifact.resource, Linkage.item.resource) are references as any.
        self.embedded = param.type == "reference" and bool(
            re.search(r"\bentry(\[\d+\])?\.resource(\s+as\s+\w+)?\s*$", param.expression))
        self.components: list[tuple[str, Evaluator | None]] = []
        #: For composites rooted at the resource: the probes of each component (all must find something).
        self.component_probes: list[tuple[frozenset[str], frozenset[str]]] | None = None
        if param.type == "composite":
            for c in param.components[:3]:
                self.components.append((c.type, compile_expression(c.expression, None, type_names)))
            if getattr(self.root, "is_self", False):
                # "Observation" as the root: every component must find its element on the resource itself.
                need = [getattr(ev, "probes", None) for _t, ev in self.components]
                if need and all(n is not None for n in need):
                    self.component_probes = need  # type: ignore[assignment]
        #: Extractors with equal keys give equal rows for one resource (same steps, same value kind). A small
        #: int standing for (type, steps, skip): a tuple of steps is hashed anew on every lookup.
        steps = getattr(self.root, "steps", None)
        #: Values → rows for this parameter's type (None: it writes no rows of its own).
        self.convert = self._converter()
        self.memo_key: int | None = (
            _MEMO_KEYS.setdefault((param.type, steps, skip), next(_MEMO_IDS))
            if steps is not None and param.type != "composite" and not self.embedded else None)

    def embedded_resources(self, resource: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.embedded or self.root is None:
            return []
        return [v for v in self.root(resource) if isinstance(v, dict) and isinstance(v.get("resourceType"), str)]

    def _converter(self) -> Callable[[list[Any]], list[tuple[Any, ...]]] | None:
        """Values → rows for this parameter's type (None: it writes no rows of its own)."""
        t = self.param.type
        if self.root is None or self.embedded:
            return None
        if t == "string":
            skip = self.skip
            return (lambda values: string_rows(values, skip)) if skip else string_rows
        if t == "reference":
            names = self.type_names
            return lambda values: reference_rows(values, names)
        if t == "composite":
            return self._composite
        return {"token": token_rows, "date": date_rows, "number": number_rows, "quantity": quantity_rows,
                "uri": uri_rows, "special": near_rows}.get(t)

    def _composite(self, items: list[Any]) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for item in items:
            cells = []
            for ctype, ev in self.components:
                vals = ev(item) if ev is not None else []
                cells.append(component_cells(ctype, vals, self.type_names) if vals else [])
            if not cells or any(not c for c in cells):
                continue
            while len(cells) < 3:
                cells.append([(None, None, None, None)])
            for combo in itertools.product(*cells):
                out.append(tuple(itertools.chain.from_iterable(combo)))
        return out if len(out) < 2 else list(dict.fromkeys(out))


#: Index table for each parameter type.
TABLE_OF = {"string": "string", "token": "token", "reference": "reference", "date": "date", "number": "number",
            "quantity": "quantity", "uri": "uri", "composite": "composite", "special": "near"}
