"""JSON for FHIR: decimals keep their exact text (``1.50`` stays ``1.50``).

Parsing goes through the standard library with ``parse_float=Decimal``; output goes through orjson,
with each Decimal written back as its own digits via ``orjson.Fragment``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson


class JSONError(ValueError):
    """The bytes are not valid JSON."""


def _reject_constant(name: str) -> Any:
    raise JSONError(f"{name} is not allowed in JSON")


_decoder = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


def loads(data: bytes | str) -> Any:
    """Parse JSON, keeping decimals as :class:`Decimal`."""
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"body is not UTF-8: {e.reason} at byte {e.start}") from None
    else:
        text = data
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return _decoder.decode(text)
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise JSONError("JSON nested too deeply") from None


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise TypeError("non-finite decimal")
        return orjson.Fragment(str(obj))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps(obj: Any, pretty: bool = False) -> bytes:
    """Serialise to UTF-8 JSON bytes; decimals keep their digits."""
    opt = orjson.OPT_INDENT_2 if pretty else 0
    return orjson.dumps(obj, default=_default, option=opt)


def fast_loads(data: bytes | str) -> Any:
    """Parse without decimal care, for data we only read (package files, indexes)."""
    return orjson.loads(data)
