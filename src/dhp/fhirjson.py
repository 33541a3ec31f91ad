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


class SourceDecimal(Decimal):
    """A decimal that remembers the exact text it was parsed from, so it is written back the same way
    (``Decimal("0.0000001")`` would print as ``1E-7``)."""

    __slots__ = ("text",)

    def __new__(cls, text: str) -> SourceDecimal:
        d = super().__new__(cls, text)
        d.text = text
        return d


def _parse_int(text: str) -> int | SourceDecimal:
    # Integers beyond 64 bits cannot be written by orjson; no FHIR integer type holds them anyway, so keep
    # their text as a number that validation will reject with a clear message (never a 500). ``-0`` keeps its
    # text too: a decimal element keeps its sign, an integer element refuses it (the FHIR integer syntax has
    # no -0).
    value = int(text)
    if -(2**63) <= value < 2**64 and text != "-0":
        return value
    return SourceDecimal(text)


_decoder = json.JSONDecoder(parse_float=SourceDecimal, parse_int=_parse_int, parse_constant=_reject_constant)


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
        text = getattr(obj, "text", None)
        return orjson.Fragment(text if text is not None else str(obj))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps(obj: Any, pretty: bool = False) -> bytes:
    """Serialise to UTF-8 JSON bytes; decimals keep their digits."""
    opt = orjson.OPT_INDENT_2 if pretty else 0
    return orjson.dumps(obj, default=_default, option=opt)


def fast_loads(data: bytes | str) -> Any:
    """Parse without decimal care, for data we only read (package files, indexes)."""
    return orjson.loads(data)
