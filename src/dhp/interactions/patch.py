"""PATCH: JSON Patch (RFC 6902) and FHIRPath Patch (a Parameters resource), on decimal-preserving dicts."""

from __future__ import annotations

import copy
from typing import Any

from dhp.errors import FHIRError, bad_request


def _unprocessable(msg: str, expression: str | None = None) -> FHIRError:
    return FHIRError(422, msg, "processing", expression=expression, message_id="patch-failed")


# ---------------------------------------------------------------- JSON Patch


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"JSON Pointer must start with '/': {path!r}", message_id="patch-invalid")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str], path: str) -> Any:
    cur = doc
    for t in tokens:
        if isinstance(cur, dict):
            if t not in cur:
                raise _unprocessable(f"path {path!r} does not exist")
            cur = cur[t]
        elif isinstance(cur, list):
            cur = cur[_index(cur, t, path, allow_end=False)]
        else:
            raise _unprocessable(f"path {path!r} does not exist")
    return cur


def _index(arr: list[Any], token: str, path: str, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(arr)
    # ASCII digits only: "²".isdigit() is true but int("²") fails.
    if not (token.isascii() and token.isdigit()) or (token.startswith("0") and token != "0"):
        raise _unprocessable(f"bad array index {token!r} in {path!r}")
    i = int(token)
    if i > len(arr) or (i == len(arr) and not allow_end):
        raise _unprocessable(f"array index {i} out of range in {path!r}")
    return i


def _add(doc: Any, path: str, value: Any) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, allow_end=True), value)
    else:
        raise _unprocessable(f"cannot add at {path!r}")
    return doc


def _remove(doc: Any, path: str) -> tuple[Any, Any]:
    tokens = _pointer(path)
    if not tokens:
        raise _unprocessable("cannot remove the whole resource")
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _unprocessable(f"path {path!r} does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, path, allow_end=False))
    raise _unprocessable(f"path {path!r} does not exist")


def apply_json_patch(resource: dict[str, Any], ops: Any) -> dict[str, Any]:
    if not isinstance(ops, list):
        raise bad_request("a JSON Patch document is an array of operations", message_id="patch-invalid")
    doc: Any = copy.deepcopy(resource)
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or not isinstance(op.get("path"), str):
            raise bad_request(f"JSON Patch operation {n} needs 'op' and 'path'", message_id="patch-invalid")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise bad_request(f"JSON Patch operation {n} ({kind}) needs 'value'", message_id="patch-invalid")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc, _ = _remove(doc, path)
        elif kind == "replace":
            _walk(doc, _pointer(path), path)
            doc, _ = _remove(doc, path) if _pointer(path) else (doc, None)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            src = op.get("from")
            if not isinstance(src, str):
                raise bad_request(f"JSON Patch operation {n} ({kind}) needs 'from'", message_id="patch-invalid")
            if kind == "move":
                if path.startswith(src + "/"):
                    raise _unprocessable("cannot move a value into itself")
                doc, value = _remove(doc, src)
            else:
                value = copy.deepcopy(_walk(doc, _pointer(src), src))
            doc = _add(doc, path, value)
        elif kind == "test":
            if _walk(doc, _pointer(path), path) != op["value"]:
                raise _unprocessable(f"JSON Patch test failed at {path!r}")
        else:
            raise bad_request(f"unknown JSON Patch operation {kind!r}", message_id="patch-invalid")
    if not isinstance(doc, dict):
        raise _unprocessable("the patch result is not a resource")
    return doc


# ---------------------------------------------------------------- FHIRPath Patch

_compiled: dict[str, Any] = {}


def _eval(resource: dict[str, Any], path: str) -> list[Any]:
    import fhirpathpy

    fn = _compiled.get(path)
    if fn is None:
        try:
            fn = fhirpathpy.compile(path)
        except Exception as e:  # fhirpathpy raises plain exceptions on parse errors
            raise bad_request(f"invalid FHIRPath {path!r}: {e}", message_id="patch-invalid") from None
        _compiled[path] = fn
    try:
        return list(fn(resource))
    except Exception as e:
        raise _unprocessable(f"cannot evaluate {path!r}: {e}") from None


_MARK = "_dhp_loc"


def _mark_tree(root: Any) -> dict[int, tuple[Any, Any, Any]]:
    """Tag every object with a number, so results (which fhirpathpy copies) can be traced back.

    Returns number → (object, container, key).
    """
    table: dict[int, tuple[Any, Any, Any]] = {}
    stack: list[tuple[Any, Any, Any]] = [(root, None, None)]
    while stack:
        node, container, key = stack.pop()
        if isinstance(node, dict):
            n = len(table)
            node[_MARK] = n
            table[n] = (node, container, key)
            stack.extend((v, node, k) for k, v in node.items() if k != _MARK)
        elif isinstance(node, list):
            stack.extend((v, node, i) for i, v in enumerate(node))
    return table


def _unmark(root: Any) -> None:
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            node.pop(_MARK, None)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _eval_marked(doc: dict[str, Any], path: str) -> tuple[list[Any], dict[int, tuple[Any, Any, Any]]]:
    table = _mark_tree(doc)
    try:
        return _eval(doc, path), table
    finally:
        _unmark(doc)


def _objects(doc: dict[str, Any], path: str) -> list[tuple[Any, Any, Any]]:
    """(original object, container, key) for each object the path selects."""
    results, table = _eval_marked(doc, path)
    out = []
    for r in results:
        if isinstance(r, dict) and isinstance(r.get(_MARK), int) and r[_MARK] in table:
            out.append(table[r[_MARK]])
    return out


def _split(path: str) -> tuple[str, str] | None:
    """Split ``A.b.c`` into (``A.b``, ``c``) when the last step is a plain element name."""
    depth = 0
    for i in range(len(path) - 1, -1, -1):
        ch = path[i]
        if ch in ")]":
            depth += 1
        elif ch in "([":
            depth -= 1
        elif ch == "." and depth == 0:
            name = path[i + 1:]
            if name.isidentifier():
                return path[:i], name
            return None
    return None


def _targets(resource: dict[str, Any], path: str) -> list[tuple[Any, Any]]:
    """Locations (container, key) the path designates."""
    locs: list[tuple[Any, Any]] = []
    objs = _objects(resource, path)
    if objs:
        return [(c, k) for _, c, k in objs if c is not None]
    split = _split(path)
    if split is None:
        return locs
    parent_path, name = split
    for parent, _, _ in _objects(resource, parent_path):
        if isinstance(parent, dict) and name in parent:
            val = parent[name]
            if isinstance(val, list):
                locs.extend((val, i) for i in range(len(val)))
            else:
                locs.append((parent, name))
    return locs


def _value_of(part: dict[str, Any]) -> Any:
    for k, v in part.items():
        if k.startswith("value"):
            return copy.deepcopy(v)
    if "part" in part:
        # An anonymous type given as parts: each part's name is an element of the value.
        return {p["name"]: _value_of(p) for p in _list(part["part"], "part")
                if isinstance(p, dict) and isinstance(p.get("name"), str)}
    return None


def _list(value: Any, what: str) -> list[Any]:
    """A Parameters array element (``parameter``, ``part``); anything else is a malformed patch."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request(f"FHIRPath Patch: '{what}' must be an array", message_id="patch-invalid")
    return value


def _str(part: dict[str, Any] | None, key: str) -> str | None:
    """A part's primitive value when it is a string (a wrong JSON type counts as missing)."""
    v = (part or {}).get(key)
    return v if isinstance(v, str) else None


def _int(part: dict[str, Any] | None) -> int | None:
    v = (part or {}).get("valueInteger")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def apply_fhirpath_patch(resource: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(resource)
    ops = [p for p in _list(params.get("parameter"), "parameter")
           if isinstance(p, dict) and p.get("name") == "operation"]
    if not ops:
        raise bad_request("a FHIRPath Patch needs at least one 'operation' parameter", message_id="patch-invalid")
    for n, op in enumerate(ops):
        parts = {p["name"]: p for p in _list(op.get("part"), "part")
                 if isinstance(p, dict) and isinstance(p.get("name"), str)}
        kind = _str(parts.get("type"), "valueCode")
        path = _str(parts.get("path"), "valueString")
        if not kind or not path:
            raise bad_request(f"FHIRPath Patch operation {n} needs 'type' and 'path'", message_id="patch-invalid")
        value = _value_of(parts["value"]) if "value" in parts else None
        if value == {} or value == []:  # FHIR has no empty objects: parts none of which named an element
            raise bad_request(f"FHIRPath Patch operation {n}: 'value' is empty", message_id="patch-invalid")
        if kind == "add":
            name = _str(parts.get("name"), "valueString")
            if not name or value is None:
                raise bad_request(f"operation {n} (add) needs 'name' and 'value'", message_id="patch-invalid")
            containers = [o for o, _, _ in _objects(doc, path)]
            if len(containers) != 1:
                raise _unprocessable(f"add: path {path!r} must designate exactly one element", path)
            c = containers[0]
            if name in c and isinstance(c[name], list):
                c[name].append(value)
            elif name in c:
                raise _unprocessable(f"add: {path}.{name} already has a value", path)
            else:
                c[name] = value
        elif kind == "insert":
            index = _int(parts.get("index"))
            split = _split(path)
            if value is None or not isinstance(index, int) or split is None:
                raise bad_request(f"operation {n} (insert) needs 'value', 'index' and a list path",
                                  message_id="patch-invalid")
            parents = [o for o, _, _ in _objects(doc, split[0])]
            if len(parents) != 1:
                raise _unprocessable(f"insert: path {path!r} must designate one list", path)
            lst = parents[0].setdefault(split[1], [])
            if not isinstance(lst, list) or not 0 <= index <= len(lst):
                raise _unprocessable(f"insert: index {index} out of range for {path}", path)
            lst.insert(index, value)
        elif kind in ("delete", "replace"):
            locs = _targets(doc, path)
            if kind == "delete":
                if len(locs) > 1:
                    raise _unprocessable(f"delete: path {path!r} designates more than one element", path)
                for container, key in locs:  # deleting nothing is not an error
                    container.pop(key)
            else:
                if value is None:
                    raise bad_request(f"operation {n} (replace) needs 'value'", message_id="patch-invalid")
                if len(locs) != 1:
                    raise _unprocessable(f"replace: path {path!r} must designate exactly one element", path)
                container, key = locs[0]
                container[key] = value
        elif kind == "move":
            src = _int(parts.get("source"))
            dst = _int(parts.get("destination"))
            split = _split(path)
            if not isinstance(src, int) or not isinstance(dst, int) or split is None:
                raise bad_request(f"operation {n} (move) needs 'source' and 'destination'",
                                  message_id="patch-invalid")
            parents = [o for o, _, _ in _objects(doc, split[0])]
            lst = parents[0].get(split[1]) if len(parents) == 1 else None
            if not isinstance(lst, list) or not (0 <= src < len(lst) and 0 <= dst < len(lst)):
                raise _unprocessable(f"move: indexes out of range for {path}", path)
            lst.insert(dst, lst.pop(src))
        else:
            raise bad_request(f"unknown FHIRPath Patch operation type {kind!r}", message_id="patch-invalid")
    _prune(doc)
    return doc


def _prune(node: Any) -> None:
    """Drop lists and objects a delete left empty (FHIR forbids empty arrays/objects)."""
    if isinstance(node, dict):
        for k in list(node):
            _prune(node[k])
            if node[k] in ([], {}):
                del node[k]
    elif isinstance(node, list):
        for v in node:
            _prune(v)
        node[:] = [v for v in node if v not in ([], {})]
