"""Checks on a SearchParameter written through the API, before it is stored.

An API-written parameter takes effect at once: every later write of its base types runs its expression, and
searches read what it indexed. A definition this server cannot load or evaluate (wrong JSON types, FHIRPath
that does not parse, a function fhirpathpy lacks, a base that is not a resource type) would otherwise fail
those writes, or be searched silently as if nothing matched. Problems that can be known from the definition
alone are refused here; a value one resource cannot give is skipped at indexing time (``SearchEngine``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from dhp import fhirpathsyntax
from dhp.errors import Issue
from dhp.search.extract import compile_expression
from dhp.search.params import ParamRegistry

#: R5 SearchParamType codes.
PARAM_TYPES = frozenset({"number", "date", "string", "token", "reference", "composite", "quantity", "uri",
                         "special", "resource"})

#: A code usable as a query parameter name: ``:`` starts a modifier, ``.`` a chain, ``,`` ``$`` ``|`` split
#: values. (Every code of the R5 core and the loaded IGs matches.)
_CODE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")

#: The longest R5 core expression is ~3,100 characters; expressions run on every write of their base types.
MAX_EXPRESSION = 10_000

#: Functions that cannot be allowed in an expression every write runs: regular expressions written by a client
#: can backtrack for minutes on a crafted value (the event loop would stall), unbounded iteration, values
#: that change with the clock (the index would go stale), and log output per resource.
_REFUSED_FUNCTIONS = {
    "matches": "a regular expression", "replaceMatches": "a regular expression", "repeat": "unbounded iteration",
    "aggregate": "unbounded iteration", "descendants": "a walk of the whole resource", "trace": "log output",
    "now": "the clock", "today": "the clock", "timeOfDay": "the clock",
}


def _issue(msg: str, where: str, message_id: str, code: str = "invalid") -> Issue:
    return Issue("error", code, msg, [f"SearchParameter.{where}"], message_id)


def _fhirpath_problem(expr: str) -> str | None:
    """Why ``expr`` is not FHIRPath this server can run, or None."""
    from fhirpathpy.engine.invocations import invocation_registry

    try:
        tree = fhirpathsyntax.parse(expr)
    except ValueError as e:
        return f"it does not parse: {e}"
    resolve_is = re.compile(r"resolve\(\)\s+is\s+[A-Za-z]+")
    for name in _functions(tree):
        if name in _REFUSED_FUNCTIONS:
            return f"{name}() is not allowed in search expressions ({_REFUSED_FUNCTIONS[name]})"
        if name == "resolve":
            continue  # checked below: only ``where(resolve() is Type)`` is understood
        if name not in invocation_registry:
            return f"the function {name}() is not supported"
    if "resolve" in expr and len(re.findall(r"resolve\(\)", expr)) != len(resolve_is.findall(expr)):
        return "resolve() is supported only as where(resolve() is Type)"
    return None


def _functions(tree: Any) -> Iterator[str]:
    """Names of the functions an expression's AST calls."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "Functn":
            for ch in node.get("children") or []:
                if isinstance(ch, dict) and ch.get("type") == "Identifier":
                    yield str(ch.get("text", ""))
                    break
        stack.extend(node.get("children") or [])


def check(sp: dict[str, Any], params: ParamRegistry, overlay: list[dict[str, Any]]) -> list[Issue]:
    """Problems that must refuse ``sp``. ``overlay``: the other API-written SearchParameters."""
    issues: list[Issue] = []
    types = params.resource_types
    bases_ok = types | {"Resource", "DomainResource"}
    code, ptype, base, expr = sp.get("code"), sp.get("type"), sp.get("base"), sp.get("expression")
    if not isinstance(code, str) or not _CODE.match(code):
        issues.append(_issue(f"code {code!r} cannot be a search parameter name: letters, digits, '_' and '-' "
                             "only, at most 64", "code", "searchparam-code-invalid"))
    if not isinstance(ptype, str) or ptype not in PARAM_TYPES:
        issues.append(_issue(f"type {ptype!r} is not a search parameter type ({', '.join(sorted(PARAM_TYPES))})",
                             "type", "searchparam-type-invalid"))
    if not isinstance(base, list) or not base or not all(isinstance(b, str) for b in base):
        issues.append(_issue("base must be a non-empty list of resource type names", "base",
                             "searchparam-base-invalid"))
        base = []
    elif unknown := [b for b in base if b not in bases_ok]:
        issues.append(_issue(f"base names {', '.join(map(repr, unknown[:5]))}, not a resource type", "base",
                             "searchparam-base-invalid"))
        base = []
    for key in ("target", "modifier", "chain", "comparator"):
        v = sp.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            issues.append(_issue(f"{key} must be a list of strings", key, "searchparam-structure"))
    target = sp.get("target")
    if isinstance(target, list) and (unknown := [t for t in target if isinstance(t, str) and t not in types]):
        issues.append(_issue(f"target names {', '.join(map(repr, unknown[:5]))}, not a resource type", "target",
                             "searchparam-target-invalid"))
    if expr is not None and not isinstance(expr, str):
        issues.append(_issue("expression must be a string", "expression", "searchparam-structure"))
    elif isinstance(expr, str) and expr.strip():
        issues += _check_expression(expr, "expression", [b for b in base if isinstance(b, str)], types)
    elif ptype not in ("special", "resource"):
        # Without an expression nothing is indexed: every search on it would silently find nothing.
        issues.append(_issue("expression is required: this server indexes a parameter by its expression",
                             "expression", "searchparam-expression-missing", "required"))
    comps = sp.get("component")
    if comps is not None:
        issues += _check_components(comps, ptype, params, types)
    elif ptype == "composite":
        issues.append(_issue("a composite parameter needs components", "component",
                             "searchparam-component-invalid", "required"))
    if isinstance(code, str) and isinstance(base, list) and sp.get("status") != "retired":
        for other in overlay:
            if other.get("id") == sp.get("id") or other.get("status") == "retired" or other.get("code") != code:
                continue
            shared = set(base) & {b for b in other.get("base") or [] if isinstance(b, str)}
            if shared:
                # Only one of them would be used (whichever loads first): refuse, never pick silently.
                issues.append(_issue(f"SearchParameter/{other.get('id')} already defines '{code}' on "
                                     f"{', '.join(sorted(shared))}", "code", "searchparam-code-duplicate",
                                     "duplicate"))
                break
    return issues


def _check_expression(expr: str, where: str, bases: list[str], types: frozenset[str]) -> list[Issue]:
    if len(expr) > MAX_EXPRESSION:
        return [_issue(f"{where} is {len(expr)} characters long, more than {MAX_EXPRESSION}", where,
                       "searchparam-expression-invalid", "too-costly")]
    why = _fhirpath_problem(expr)
    if why is not None:
        return [_issue(f"{where} {expr[:200]!r} cannot be evaluated: {why}", where,
                       "searchparam-expression-invalid")]
    for b in bases:
        try:
            ev = compile_expression(expr, b, types)
        except Exception as e:  # what would fail every write of the type
            return [_issue(f"{where} {expr[:200]!r} cannot be compiled: {e}", where,
                           "searchparam-expression-invalid")]
        if ev is None and b not in ("Resource", "DomainResource"):  # those compile per concrete type
            # Every part is about another type: the parameter would index nothing on this base.
            return [_issue(f"{where} {expr[:200]!r} finds nothing on base {b}", where,
                           "searchparam-expression-invalid")]
    return []


def _check_components(comps: Any, ptype: Any, params: ParamRegistry, types: frozenset[str]) -> list[Issue]:
    if ptype != "composite":
        return [_issue("only a composite parameter has components", "component", "searchparam-component-invalid")]
    if not isinstance(comps, list) or not comps:
        return [_issue("component must be a non-empty list", "component", "searchparam-component-invalid")]
    if len(comps) > 3:
        return [_issue(f"{len(comps)} components: this server indexes composites of at most 3", "component",
                       "searchparam-component-invalid", "not-supported")]
    issues: list[Issue] = []
    for i, c in enumerate(comps):
        where = f"component[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("definition"), str) \
                or not isinstance(c.get("expression"), str) or not c["expression"].strip():
            issues.append(_issue(f"{where} needs a definition and an expression, both strings", where,
                                 "searchparam-component-invalid"))
            continue
        d = params.by_url(c["definition"])
        if d is not None and d.type == "composite":
            issues.append(_issue(f"{where}.definition {c['definition']!r} is itself a composite parameter", where,
                                 "searchparam-component-invalid"))
            continue
        issues += _check_expression(c["expression"], f"{where}.expression", [], types)
    return issues
