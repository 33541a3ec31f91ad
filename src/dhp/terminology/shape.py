"""JSON-type checks for terminology resources and data types that arrive inside a request (an inline
``valueSet``/``codeSystem``/``conceptMap``, a Coding, a CodeableConcept).

Stored resources are checked on write; request bodies are not, and the engine reads them assuming FHIR JSON
types (``system`` is a string, ``concept`` a list of objects, …). A wrong type there must be the client's
400, not a crash inside the engine.
"""

from __future__ import annotations

from typing import Any

from dhp.errors import bad_request


class ShapeError(Exception):
    def __init__(self, where: str, want: str) -> None:
        super().__init__(f"{where} must be {want}")
        self.where = where


def _str(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if k in d and d[k] is not None and not isinstance(d[k], str):
            raise ShapeError(f"{where}.{k}", "a string")


def _bool(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if k in d and d[k] is not None and not isinstance(d[k], bool):
            raise ShapeError(f"{where}.{k}", "true or false")


def _objects(d: dict[str, Any], key: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """``d[key]`` as (path, object) pairs; it must be a list of JSON objects (or absent)."""
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise ShapeError(f"{where}.{key}", "an array")
    out = []
    for i, x in enumerate(v):
        if not isinstance(x, dict):
            raise ShapeError(f"{where}.{key}[{i}]", "an object")
        out.append((f"{where}.{key}[{i}]", x))
    return out


def _object(d: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise ShapeError(f"{where}.{key}", "an object")
    return v


def _coding(c: dict[str, Any], where: str) -> None:
    _str(c, ("system", "version", "code", "display"), where)


def _designations(d: dict[str, Any], where: str) -> None:
    for w, x in _objects(d, "designation", where):
        _str(x, ("language", "value"), w)
        use = _object(x, "use", w)
        if use is not None:
            _coding(use, w + ".use")


def check_coding(c: dict[str, Any], where: str) -> None:
    _coding(c, where)


def check_codeable(cc: dict[str, Any], where: str) -> None:
    _str(cc, ("text",), where)
    for w, c in _objects(cc, "coding", where):
        _coding(c, w)


def _contains(d: dict[str, Any], where: str, depth: int = 0) -> None:
    for w, c in _objects(d, "contains", where):
        _str(c, ("system", "version", "code", "display"), w)
        _bool(c, ("abstract", "inactive"), w)
        _designations(c, w)
        if depth < 100:
            _contains(c, w, depth + 1)


def check_valueset(vs: dict[str, Any], where: str = "ValueSet") -> None:
    _str(vs, ("url", "version", "id"), where)
    compose = _object(vs, "compose", where)
    if compose is not None:
        w0 = where + ".compose"
        _bool(compose, ("inactive",), w0)
        for kind in ("include", "exclude"):
            for w, inc in _objects(compose, kind, w0):
                _str(inc, ("system", "version"), w)
                refs = inc.get("valueSet")
                if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
                    raise ShapeError(f"{w}.valueSet", "an array of canonical URLs")
                for wc, c in _objects(inc, "concept", w):
                    _str(c, ("code", "display"), wc)
                    _designations(c, wc)
                for wf, f in _objects(inc, "filter", w):
                    _str(f, ("property", "op", "value"), wf)
    expansion = _object(vs, "expansion", where)
    if expansion is not None:
        _contains(expansion, where + ".expansion")


# Deeper concept nesting is refused rather than left unchecked: the index walks it recursively.
MAX_CONCEPT_DEPTH = 100


def _cs_concepts(d: dict[str, Any], where: str, depth: int = 0) -> None:
    for w, c in _objects(d, "concept", where):
        _str(c, ("code", "display", "definition"), w)
        _designations(c, w)
        for wp, p in _objects(c, "property", w):
            _str(p, ("code",), wp)
        if c.get("concept") is not None:
            if depth >= MAX_CONCEPT_DEPTH:
                raise ShapeError(f"{w}.concept", f"nested at most {MAX_CONCEPT_DEPTH} levels deep")
            _cs_concepts(c, w, depth + 1)


def check_codesystem(cs: dict[str, Any], where: str = "CodeSystem") -> None:
    _str(cs, ("url", "version", "id", "name", "title", "content", "language", "supplements",
              "hierarchyMeaning"), where)
    _bool(cs, ("caseSensitive",), where)
    for w, p in _objects(cs, "property", where):
        _str(p, ("code", "uri"), w)
    _cs_concepts(cs, where)


def check_conceptmap(cm: dict[str, Any], where: str = "ConceptMap") -> None:
    _str(cm, ("url", "version", "id"), where)
    for wg, g in _objects(cm, "group", where):
        _str(g, ("source", "target"), wg)
        for we, el in _objects(g, "element", wg):
            _str(el, ("code", "display", "valueSet"), we)
            _bool(el, ("noMap",), we)
            for wt, t in _objects(el, "target", we):
                _str(t, ("code", "display", "relationship", "equivalence", "valueSet"), wt)
                for key in ("dependsOn", "product", "property"):
                    for wd, dep in _objects(t, key, wt):
                        _str(dep, ("attribute", "property", "code"), wd)
        um = _object(g, "unmapped", wg)
        if um is not None:
            _str(um, ("mode", "code", "display", "otherMap", "relationship", "valueSet"), wg + ".unmapped")


_CHECKS = {"ValueSet": check_valueset, "CodeSystem": check_codesystem, "ConceptMap": check_conceptmap}


def shape_problem(res: dict[str, Any]) -> ShapeError | None:
    """The first wrong JSON type in a terminology resource about to be stored, if any."""
    check = _CHECKS.get(str(res.get("resourceType")))
    try:
        if check is not None:
            check(res)
    except ShapeError as e:
        return e
    return None


def check_resource(res: dict[str, Any], param: str) -> None:
    """400 when an inline terminology resource (parameter ``param``) has a wrong JSON type somewhere."""
    check = _CHECKS.get(str(res.get("resourceType")))
    if check is None:
        return
    try:
        check(res)
    except ShapeError as e:
        raise bad_request(f"parameter '{param}': {e}", e.where) from None


def check_datatype(kind: str, value: dict[str, Any], param: str) -> None:
    """400 when a Coding or CodeableConcept parameter has a wrong JSON type inside."""
    try:
        (check_coding if kind == "Coding" else check_codeable)(value, kind)
    except ShapeError as e:
        raise bad_request(f"parameter '{param}': {e}", param) from None

