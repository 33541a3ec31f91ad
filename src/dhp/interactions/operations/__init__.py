"""FHIR operations (``$name``): one module per operation in this package, registered with :func:`operation`.

An operation module looks like::

    from dhp.interactions.operations import OperationCall, operation

    @operation("expand", types=("ValueSet",), type_level=True, instance=True)
    async def expand(call: OperationCall) -> dict:
        url = call.params.str("url")
        ...
        return {"resourceType": "ValueSet", ...}        # 200 with that body
        # or: return OperationResult(status=201, resource=..., headers={...})

Every module in this package is imported at start-up, so adding an operation is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from dhp.errors import bad_request

if TYPE_CHECKING:
    from dhp.interactions.context import RequestContext, Server


# Parameter value[x] names, for reading typed values out of a Parameters resource.
_VALUE_PREFIX = "value"


def _check_parameters(params: list[Any], where: str, depth: int = 0) -> None:
    """Each parameter has a name and at most one of value[x], resource and part (Parameters inv-1); a null
    value is malformed JSON for FHIR, not an absent parameter; parts nest the same way."""
    if depth > 32:
        raise bad_request("parameters are nested too deeply", where)
    for i, p in enumerate(params):
        at = f"{where}[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise bad_request("each parameter needs a name", at)
        values = [k for k in p if k.startswith(_VALUE_PREFIX)]
        for k in values:
            if p[k] is None:
                raise bad_request(f"parameter '{p['name']}': {k} is null", f"{at}.{k}")
        if len(values) + ("resource" in p) + ("part" in p) > 1:
            raise bad_request(f"parameter '{p['name']}' has more than one of value[x], resource and part", at)
        if "part" in p:
            if not isinstance(p["part"], list):
                raise bad_request(f"parameter '{p['name']}': part must be an array", f"{at}.part")
            _check_parameters(p["part"], f"{at}.part", depth + 1)


class Params:
    """The parameters of one operation call, from a Parameters body or the query string.

    Query-string values arrive as strings; typed accessors convert them and raise a 400 on bad input.
    """

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items  # Parameters.parameter entries

    @classmethod
    def from_query(cls, query: list[tuple[str, str]]) -> Params:
        return cls([{"name": k, "valueString": v} for k, v in query if not k.startswith("_")])

    @classmethod
    def from_resource(cls, body: dict[str, Any]) -> Params:
        params = body.get("parameter") or []
        if not isinstance(params, list):
            raise bad_request("Parameters.parameter must be an array", "Parameters.parameter")
        _check_parameters(params, "Parameters.parameter")
        return cls(params)

    def names(self) -> set[str]:
        return {p["name"] for p in self.items}

    def has(self, name: str) -> bool:
        return any(p["name"] == name for p in self.items)

    def all(self, name: str) -> list[dict[str, Any]]:
        return [p for p in self.items if p["name"] == name]

    @staticmethod
    def value_of(p: dict[str, Any]) -> Any:
        if "resource" in p:
            return p["resource"]
        for k, v in p.items():
            if k.startswith(_VALUE_PREFIX):
                return v
        if "part" in p:
            return Params(p["part"])
        return None

    def value(self, name: str) -> Any:
        for p in self.items:
            if p["name"] == name:
                return self.value_of(p)
        return None

    def values(self, name: str) -> list[Any]:
        return [self.value_of(p) for p in self.items if p["name"] == name]

    def str(self, name: str) -> str | None:
        v = self.value(name)
        if v is None:
            return None
        if isinstance(v, str | int | Decimal) and not isinstance(v, bool):
            return str(v)
        raise bad_request(f"parameter '{name}' must be a simple value", name)

    def int(self, name: str) -> int | None:
        v = self.value(name)
        if v is None:
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        try:
            return int(str(v))
        except ValueError:
            raise bad_request(f"parameter '{name}' must be an integer, not {v!r}", name) from None

    def bool(self, name: str) -> bool | None:
        v = self.value(name)
        if v is None or isinstance(v, bool):
            return v
        s = str(v).lower()
        if s in ("true", "false"):
            return s == "true"
        raise bad_request(f"parameter '{name}' must be true or false, not {v!r}", name)

    def decimal(self, name: str) -> Decimal | None:
        v = self.value(name)
        if v is None:
            return None
        try:
            return Decimal(str(v))
        except InvalidOperation:
            raise bad_request(f"parameter '{name}' must be a number, not {v!r}", name) from None


@dataclass
class OperationCall:
    server: Server
    ctx: RequestContext
    name: str
    resource_type: str | None
    id: str | None
    params: Params
    method: str  # GET or POST
    body: dict[str, Any] | None = None  # a non-Parameters body, when the operation takes one
    source: bytes | None = None  # the raw bytes of ``body`` (for line/column in messages)


@dataclass
class OperationResult:
    resource: dict[str, Any] | None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # already-serialised body (e.g. stored bytes)
    media_type: str | None = None


Handler = Callable[[OperationCall], Awaitable["dict[str, Any] | OperationResult"]]


@dataclass
class OperationDef:
    name: str
    handler: Handler
    types: tuple[str, ...] | None  # None: any resource type
    system: bool
    type_level: bool
    instance: bool
    affects_state: bool
    definition: str | None  # canonical URL of the OperationDefinition, for the CapabilityStatement

    def allowed(self, level: str, rtype: str | None) -> bool:
        if level == "system":
            return self.system
        if self.types is not None and rtype not in self.types:
            return False
        return self.type_level if level == "type" else self.instance


OPERATIONS: dict[str, list[OperationDef]] = {}


def operation(name: str, *, types: tuple[str, ...] | None = None, system: bool = False,
              type_level: bool = True, instance: bool = False, affects_state: bool = False,
              definition: str | None = None) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        OPERATIONS.setdefault(name, []).append(OperationDef(
            name, fn, types, system, type_level, instance, affects_state, definition))
        return fn
    return deco


def find(name: str, level: str, rtype: str | None) -> OperationDef | None:
    for d in OPERATIONS.get(name, ()):
        if d.allowed(level, rtype):
            return d
    return None


_loaded = False


def load_all() -> None:
    """Import every operation module in this package."""
    global _loaded
    if _loaded:
        return
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")
    _loaded = True
