"""FHIRPath for invariants: fhirpathpy, each expression compiled once, plus the FHIR functions it lacks.

fhirpathpy calls user functions with the input collection only, so the evaluation environment (the
resource being validated, the Bundle index, the validator for ``conformsTo``/``memberOf``) travels in a
context variable set around each evaluation.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import fhirpathpy
from fhirpathpy import engine as _engine
from fhirpathpy.engine.nodes import FP_Quantity, FP_Type, ResourceNode
from fhirpathpy.models import models

from dhp.regexguard import vetted
from dhp.validation.fastpath import spend
from dhp.validation.primitives import date_bounds
from dhp.validation.xhtml import check_xhtml

MODEL = models["r5"]


@dataclass
class Env:
    """What user functions need while one expression runs."""

    resolve: Callable[[str], dict[str, Any] | None]
    member_of: Callable[[Any, str], bool | None]
    conforms_to: Callable[[Any, str], bool]


_env: contextvars.ContextVar[Env | None] = contextvars.ContextVar("dhp_fhirpath_env", default=None)


class NotEvaluable(Exception):
    """A function could not give an answer (e.g. memberOf on a code system that is not loaded)."""


def _data(x: Any) -> Any:
    return x.data if isinstance(x, ResourceNode) else x


def _has_value(inputs: list[Any]) -> list[bool]:
    if len(inputs) != 1:
        return [False]
    v = _data(inputs[0])
    return [not isinstance(v, dict | list) and v is not None]


def _get_value(inputs: list[Any]) -> list[Any]:
    if len(inputs) != 1:
        return []
    v = _data(inputs[0])
    return [] if isinstance(v, dict | list) or v is None else [v]


def _resolve(inputs: list[Any]) -> list[Any]:
    env = _env.get()
    out: list[Any] = []
    for i in inputs:
        v = _data(i)
        ref = v.get("reference") if isinstance(v, dict) else v
        if not isinstance(ref, str) or env is None:
            continue
        target = env.resolve(ref)
        if target is not None:
            out.append(ResourceNode.create_node(target, target.get("resourceType")))
    return out


def _member_of(inputs: list[Any], valueset: Any) -> list[bool]:
    env = _env.get()
    vs = _data(valueset[0]) if isinstance(valueset, list) and valueset else _data(valueset)
    if env is None or len(inputs) != 1 or not isinstance(vs, str):
        return []
    answer = env.member_of(_data(inputs[0]), vs)
    if answer is None:
        raise NotEvaluable(f"memberOf('{vs}') could not be checked: code system or value set not loaded")
    return [answer]


def _conforms_to(inputs: list[Any], url: Any) -> list[bool]:
    env = _env.get()
    u = _data(url[0]) if isinstance(url, list) and url else _data(url)
    if env is None or len(inputs) != 1 or not isinstance(u, str):
        return []
    return [env.conforms_to(_data(inputs[0]), u)]


def _boundary(inputs: list[Any], high: bool) -> list[Any]:
    if len(inputs) != 1:
        return []
    v = _data(inputs[0])
    if isinstance(v, dict):  # Quantity: boundary of its value
        v = v.get("value")
    if isinstance(v, FP_Type):
        v = str(v)
    if isinstance(v, bool):
        return []
    if isinstance(v, int | Decimal | float):
        d = Decimal(str(v))
        exp = d.as_tuple().exponent
        half = Decimal(5).scaleb(int(exp) - 1) if isinstance(exp, int) else Decimal(0)
        return [d + half if high else d - half]
    if isinstance(v, str):
        b = date_bounds(v)
        if b:
            return [b[1] if high else b[0]]
    return []


def _low(inputs: list[Any], *_: Any) -> list[Any]:
    return _boundary(inputs, False)


def _high(inputs: list[Any], *_: Any) -> list[Any]:
    return _boundary(inputs, True)


def _matches_full(inputs: list[Any], regex: Any) -> list[bool]:
    r = _data(regex[0]) if isinstance(regex, list) and regex else _data(regex)
    if len(inputs) != 1 or not isinstance(r, str):
        return []
    v = _data(inputs[0])
    if not isinstance(v, str):
        return []
    return [vetted(r, re.S).fullmatch(v) is not None]


def _matches(inputs: list[Any], regex: Any) -> list[bool]:
    # fhirpathpy's own matches()/replaceMatches() run any pattern: these vet it first (RiskyRegex).
    r = _data(regex[0]) if isinstance(regex, list) and regex else _data(regex)
    if len(inputs) != 1 or not isinstance(r, str) or not r:
        return []
    v = _data(inputs[0])
    if not isinstance(v, str):
        return []
    return [vetted(r, re.S).search(v) is not None]


def _replace_matches(inputs: list[Any], regex: Any, repl: Any) -> list[str]:
    r = _data(regex[0]) if isinstance(regex, list) and regex else _data(regex)
    s = _data(repl[0]) if isinstance(repl, list) and repl else _data(repl)
    if len(inputs) != 1 or not isinstance(r, str) or not isinstance(s, str):
        return []
    v = _data(inputs[0])
    if not isinstance(v, str):
        return []
    return [vetted(r).sub(re.sub(r"\$(\d+)", r"\\\1", s), v)]


def _html_checks(inputs: list[Any]) -> list[bool]:
    if len(inputs) != 1:
        return [False]
    v = _data(inputs[0])
    return [isinstance(v, str) and not check_xhtml(v)]


def _comparable(inputs: list[Any], other: Any) -> list[bool]:
    o = other[0] if isinstance(other, list) and other else other
    if len(inputs) != 1:
        return []
    a, b = _data(inputs[0]), _data(o)
    if isinstance(a, FP_Quantity) and isinstance(b, FP_Quantity):
        return [a.unit == b.unit]
    if isinstance(a, dict) and isinstance(b, dict):
        return [(a.get("system"), a.get("code")) == (b.get("system"), b.get("code"))]
    if isinstance(a, int | Decimal | float) and isinstance(b, int | Decimal | float):
        return [True]
    return [False]


def _trace(inputs: list[Any], *_: Any) -> list[Any]:
    return inputs  # invariants use trace() for debugging only; keep stdout quiet


USER_FUNCTIONS: dict[str, dict[str, Any]] = {
    "trace": {"fn": _trace, "arity": {1: ["String"], 2: ["AnyAtRoot"]}},
    "hasValue": {"fn": _has_value},
    "getValue": {"fn": _get_value},
    "resolve": {"fn": _resolve},
    "memberOf": {"fn": _member_of, "arity": {1: ["String"]}},
    "conformsTo": {"fn": _conforms_to, "arity": {1: ["String"]}},
    "lowBoundary": {"fn": _low, "arity": {0: [], 1: ["Integer"]}},
    "highBoundary": {"fn": _high, "arity": {0: [], 1: ["Integer"]}},
    "matchesFull": {"fn": _matches_full, "arity": {1: ["String"]}},
    "matches": {"fn": _matches, "arity": {1: ["String"]}},
    "replaceMatches": {"fn": _replace_matches, "arity": {2: ["String", "String"]}},
    "htmlChecks": {"fn": _html_checks},
    "comparable": {"fn": _comparable, "arity": {1: ["AnyAtRoot"]}},
}
_OPTIONS = {"userInvocationTable": USER_FUNCTIONS}

_do_eval = _engine.do_eval


def _counted_eval(ctx: Any, parent: Any, node: Any) -> Any:
    spend()  # every node fhirpathpy evaluates counts against fastpath.set_budget, when one is set
    return _do_eval(ctx, parent, node)


# fhirpathpy's evaluators call engine.do_eval through the module, so this sees every step.
if getattr(_engine.do_eval, "__name__", "") != "_counted_eval":
    _engine.do_eval = _counted_eval

_compiled: dict[str, Callable[..., list[Any]] | Exception] = {}


def compiled(expression: str) -> Callable[..., list[Any]]:
    """The compiled form of ``expression`` (cached); raises the parse error again on every call."""
    fn = _compiled.get(expression)
    if fn is None:
        try:
            fn = fhirpathpy.compile(expression, MODEL, _OPTIONS)
        except Exception as e:  # fhirpathpy raises plain Exceptions for syntax it does not know
            fn = e
        _compiled[expression] = fn
    if isinstance(fn, Exception):
        raise fn
    return fn


def evaluate(expression: str, focus: Any, type_path: str | None, env: Env | None,
             variables: dict[str, Any] | None = None) -> list[Any]:
    """Evaluate on ``focus`` (a dict or primitive); ``type_path`` (e.g. ``Observation.component``) gives
    fhirpathpy the element's type so choice elements and ``ofType`` work."""
    fn = compiled(expression)
    node = ResourceNode.create_node(focus, type_path) if type_path else focus
    token = _env.set(env)
    try:
        return fn(node, variables or {})
    finally:
        _env.reset(token)


def truthy(result: list[Any]) -> bool | None:
    """FHIRPath boolean evaluation of an invariant result: empty → None (no verdict)."""
    if not result:
        return None
    if len(result) == 1:
        v = _data(result[0])
        if isinstance(v, bool):
            return v
        return True
    return True
