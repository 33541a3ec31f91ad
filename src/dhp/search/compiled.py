"""One resource shape's index extraction generated as a single Python function.

``SearchEngine`` runs, per resource, the extractors its elements call for (``_Todo`` entries, fixed per set
of property names). Its general loop pays per parameter an attribute load, a closure call for the path, a
call for the converter, a memo lookup and a ``setdefault``: the benchmark's Patient took 11–13 µs for its
11 rows where the same work written out by hand took 4 µs (generated: ~6 µs). :func:`compile_run` writes
that loop out for one list of extractors:

- a plain path of one or two steps (``Patient.gender``, ``Patient.name.family``), or a union of one-step
  typed paths (``Observation.value.ofType(Quantity) | …``), is walked inline, its property names constants;
- parameters whose paths start at one element (``address.city``, ``address.state`` …) share its walk;
- one string (or flag) found for a token, string, uri or date parameter becomes its row without the
  converter call, as the converter's own one-value shortcut makes it;
- rows that parameters share (equal paths and kinds) are made once;
- each row is appended to its table's list directly.

Anything else calls the extractor's own evaluator and converter. Any exception re-runs the general loop,
which skips (and logs) just the parameter that failed — so the result is always the loop's, row for row.
``tests/search/test_compiled.py`` holds the two equal on generated resources of many types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dhp.search.extract import (
    _PRIMITIVE_TYPES,
    CHOICE_NAMES,
    EXACT_LEN,
    KEY_LEN,
    STR_LEN,
    _child,
    _date_pair,
    _ref_is,
    _shape_is,
    _typed_key,
    date_rows,
    reference_rows,
    stem,
    string_rows,
    token_rows,
    uri_rows,
)
from dhp.search.values import norm

Rows = dict[str, list[tuple[Any, ...]]]
Run = Callable[[dict[str, Any], str], Rows]

#: Converters whose one-string answer the generated code writes itself (see each one's shortcut).
_SHORTCUTS: dict[Any, str] = {token_rows: "token", string_rows: "string", uri_rows: "uri", date_rows: "date"}


def _shortcut(ex: Any) -> str | None:
    got = _SHORTCUTS.get(ex.convert)
    if got is None and ex.param.type == "string" and ex.skip:
        got = "string"  # string_rows with parts to skip: a plain string has no parts
    return got


class _Code:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 2

    def add(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def block(self, line: str) -> _Code:
        self.add(line)
        self.depth += 1
        return self

    def end(self, n: int = 1) -> None:
        self.depth -= n


def _append(c: _Code, lst: str, code: str, got: str) -> None:
    """Rows ``got`` (a list of value tuples) onto ``lst`` as the loop adds them."""
    c.block(f"if {got}:")
    c.block(f"if len({got}) == 1:")
    c.add(f"{lst}.append((RT, rid, {code!r}, *{got}[0]))")
    c.end()
    c.block("else:")
    c.add(f"{lst}.extend([(RT, rid, {code!r}, *x) for x in {got}])")
    c.end(2)


def _one_string(c: _Code, fast: str, lst: str, code: str, s: str) -> None:
    """The rows of one value ``s`` known to be a str (its converter's shortcut, written out)."""
    if fast == "token":
        c.block(f"if {s}:")
        c.add(f"{lst}.append((RT, rid, {code!r}, None, {s}[:KEY_LEN], None, None, None))")
        c.end()
    elif fast == "string":
        c.block(f"if {s}:")
        c.add(f"{lst}.append((RT, rid, {code!r}, norm({s})[:STR_LEN], {s}[:EXACT_LEN]))")
        c.end()
    elif fast == "uri":
        c.block(f"if {s}:")
        c.add(f"{lst}.append((RT, rid, {code!r}, {s}[:KEY_LEN]))")
        c.end()
    else:  # date
        c.add(f"p = _date_pair({s})")
        c.block("if p:")
        c.add(f"{lst}.append((RT, rid, {code!r}, *p[0]))")
        c.end()


def _nodes(c: _Code, name: str, walked: dict[str, str]) -> str:
    """A variable holding the nodes of the first step ``name`` (an element's value, a list as is), written the
    first time an extractor reads ``name``: parameters reading ``address.city``, ``address.state`` … share it."""
    var = walked.get(name)
    if var is None:
        var = walked[name] = f"N{len(walked)}"
        c.add(f"v = r.get({name!r})")
        c.block("if v is None:")
        c.add(f"{var} = _child([r], {name!r}, None)" if name in CHOICE_NAMES else f"{var} = ()")
        c.end()
        c.block("elif isinstance(v, list):")
        c.add(f"{var} = v")
        c.end()
        c.block("else:")
        c.add(f"{var} = (v,)")
        c.end()
    return var


def _add_value(c: _Code, var: str) -> None:
    """Code adding the value in ``var`` to ``vals`` as ``extract._child`` does: none for None, a list's items
    without nulls."""
    c.block(f"if {var} is not None:")
    c.block(f"if isinstance({var}, list):")
    c.add(f"vals.extend({var} if None not in {var} else [y for y in {var} if y is not None])")
    c.end()
    c.block("else:")
    c.add(f"vals.append({var})")
    c.end(2)


def _values(c: _Code, i: int, path: tuple[str, ...] | None, steps: Any, walked: dict[str, str]) -> None:
    """Code leaving the extractor's values in ``vals`` (empty or None when there are none)."""
    if path is not None and len(path) == 1:
        # _plain_path's one-step ``run``: the element's value, a list's items without nulls.
        nodes = _nodes(c, path[0], walked)
        c.add(f"vals = {nodes} if None not in {nodes} else [x for x in {nodes} if x is not None]")
    elif path is not None and len(path) == 2:
        # _plain_path's ``run`` of two steps.
        nodes = _nodes(c, path[0], walked)
        c.add("vals = []")
        c.block(f"for n in {nodes}:")
        c.block("if isinstance(n, dict):")
        c.add(f"x = n.get({path[1]!r})")
        if path[1] in CHOICE_NAMES:  # _child's search for a typed name (``sourceUri`` …)
            c.block("if x is None:")
            c.block("for k in n:")
            c.block(f"if stem(k) == {path[1]!r}:")
            c.add("x = n[k]")
            c.add("break")
            c.end(3)
        _add_value(c, "x")
        c.end(2)
    elif path is None and _one_step_parts(steps):
        # _run_native over parts of one step each (``Observation.value.ofType(Quantity) | ….ofType(SampledData)``,
        # the ``date`` parameter's typed unions): each part's values in turn.
        c.add("vals = []")
        for (kind, arg), in steps:
            name, _, typ = arg.partition("|")
            if kind == "child":
                c.add(f"v = r.get({name!r})")
                if name in CHOICE_NAMES:
                    c.block("if v is None:")
                    c.add(f"vals.extend(_child([r], {name!r}, None))")
                    c.end()
            else:  # typed: _child with a type, on the resource alone
                c.add(f"v = r.get({_typed_key(name, typ)!r})")
                c.block("if v is None:")
                c.add(f"v = r.get({name!r})")
                # Under the plain name only a value of the type's shape (primitive or not), or a list.
                wrong = "isinstance(v, dict)" if typ in _PRIMITIVE_TYPES else "not isinstance(v, (dict, list))"
                c.block(f"if v is not None and {wrong}:")
                c.add("v = None")
                c.end(2)
            _add_value(c, "v")
    elif path is None and steps and all(k in _STEP_CODE for part in steps for k, _a in part):
        # _run_native's dispatch written out: each part's steps in turn, from the resource.
        c.add("vals = []")
        for part in steps:
            c.add("nodes = [r]")
            for kind, arg in part:
                c.add(_STEP_CODE[kind](arg))
            c.add("vals.extend(nodes)")
    else:
        c.add(f"vals = R{i}(r)")


def _typed_step(arg: str) -> str:
    name, _, typ = arg.partition("|")
    return f"nodes = _child(nodes, {name!r}, {typ!r}, {_typed_key(name, typ)!r})"


def _where_eq_step(arg: str) -> str:
    key, _, lit = arg.partition("|")
    return f"nodes = [n for n in nodes if isinstance(n, dict) and n.get({key!r}) == {lit!r}]"


#: Each step kind of ``extract._run_native`` as the statement that does it to ``nodes``.
_STEP_CODE: dict[str, Callable[[str], str]] = {
    "child": lambda a: f"nodes = _child(nodes, {a!r}, None)",
    "typed": _typed_step,
    "oftype": lambda a: f"nodes = [n for n in nodes if _shape_is(n, {a!r})]",
    "whereref": lambda a: f"nodes = [n for n in nodes if _ref_is(n, {a!r})]",
    "first": lambda a: "nodes = nodes[:1]",
    "ext": lambda a: f"nodes = [e for e in _child(nodes, 'extension', None) if isinstance(e, dict) and e.get('url') == {a!r}]",
    "where_eq": _where_eq_step,
    "self": lambda a: "pass",
}


def _convert_call(ex: Any, i: int, ns: dict[str, Any]) -> str:
    """The converter call on ``vals``: the converter function itself where ParamExtractor wraps it in a lambda
    (reference rows need the type names, string rows the parts others index) — one call less."""
    t = ex.param.type
    if t == "reference":
        ns[f"T{i}"] = ex.type_names
        return f"reference_rows(vals, T{i})"
    if t == "string" and ex.skip:
        ns[f"S{i}"] = ex.skip
        return f"string_rows(vals, S{i})"
    return f"C{i}(vals)"


def _one_step_parts(steps: Any) -> bool:
    """A native path (``steps`` of ``compile_expression``) whose parts are one child or typed step each."""
    return bool(steps) and all(len(part) == 1 and part[0][0] in ("child", "typed") for part in steps)


def compile_run(rtype: str, todo: Sequence[tuple[str, str, Any, int | None]],
                fallback: Callable[[dict[str, Any], str], Rows]) -> Run | None:
    """A function (resource, id) → rows per table kind, equal to ``fallback``'s answer (the general loop over
    ``todo``). None when ``todo`` holds something only the loop does (a Bundle's embedded resources)."""
    if any(ex.embedded for _k, _c, ex, _m in todo):
        return None
    ns: dict[str, Any] = {"RT": rtype, "_child": _child, "_date_pair": _date_pair, "norm": norm, "stem": stem,
                          "_shape_is": _shape_is, "_ref_is": _ref_is,
                          "reference_rows": reference_rows, "string_rows": string_rows,
                          "KEY_LEN": KEY_LEN, "STR_LEN": STR_LEN, "EXACT_LEN": EXACT_LEN, "FALLBACK": fallback}
    c = _Code()
    lists: dict[str, str] = {}
    walked: dict[str, str] = {}
    memo_done: set[int] = set()
    for i, (kind, code, ex, mk) in enumerate(todo):
        if ex.convert is None:  # writes no rows of its own: the loop finds no values for it either
            continue
        lst = lists.setdefault(kind, f"L{len(lists)}")
        c.add(f"# {code}")
        if mk is not None and mk in memo_done:
            _append(c, lst, code, f"M{mk}")
            continue
        ns[f"R{i}"] = ex.root
        ns[f"C{i}"] = ex.convert
        _values(c, i, getattr(ex.root, "path", None), getattr(ex.root, "steps", None), walked)
        if mk is not None:
            c.add(f"M{mk} = {_convert_call(ex, i, ns)} if vals else []")
            memo_done.add(mk)
            _append(c, lst, code, f"M{mk}")
            continue
        fast = _shortcut(ex)
        c.block("if vals:")
        if fast is not None:
            c.block("if len(vals) == 1 and (s := vals[0]).__class__ is str:")
            _one_string(c, fast, lst, code, "s")
            c.end()
            if fast == "token":
                c.block("elif len(vals) == 1 and s.__class__ is bool:")
                c.add(f"{lst}.append((RT, rid, {code!r}, None, 'true' if s else 'false', None, None, None))")
                c.end()
            c.block("else:")
        c.add(f"got = {_convert_call(ex, i, ns)}")
        _append(c, lst, code, "got")
        c.end(2 if fast is not None else 1)
    head = ["def run(r, rid):", "    try:"]
    head += [f"        {name} = []" for name in lists.values()]
    tail = ["        out = {}"]
    tail += [f"        if {name}:\n            out[{kind!r}] = {name}" for kind, name in lists.items()]
    tail += ["        return out", "    except Exception:", "        return FALLBACK(r, rid)"]
    source = "\n".join([*head, *c.lines, *tail])
    exec(compile(source, f"<dhp.search rows of {rtype}>", "exec"), ns)  # code generated above, from our own parts
    run: Run = ns["run"]
    run.source = source  # type: ignore[attr-defined]  # for a reader in a debugger
    return run
