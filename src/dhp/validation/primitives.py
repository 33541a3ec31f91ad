"""Format rules for FHIR primitive types (R5 §2.1.28), checked on the parsed JSON value.

``check_primitive(type_code, value)`` returns None when the value is acceptable, else a short reason.
JSON-type rules come first (a boolean must be a JSON boolean, integers JSON numbers without a fraction,
``integer64`` a JSON string), then the lexical rule of the type.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

PRIMITIVES = frozenset({
    "boolean", "integer", "integer64", "string", "decimal", "uri", "url", "canonical", "base64Binary",
    "instant", "date", "dateTime", "time", "code", "oid", "id", "markdown", "unsignedInt", "positiveInt",
    "uuid", "xhtml",
})
STRING_LIKE = PRIMITIVES - {"boolean", "integer", "decimal", "unsignedInt", "positiveInt"}

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TZ = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?"
_DATE_RE = re.compile(rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")
_DATETIME_RE = re.compile(
    rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T{_TIME}{_TZ})?)?)?")
_INSTANT_RE = re.compile(rf"{_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T{_TIME}{_TZ}")
_TIME_RE = re.compile(_TIME)
_CODE_RE = re.compile(r"[^\s]+( [^\s]+)*")
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_OID_RE = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
_UUID_RE = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_INT_TEXT_RE = re.compile(r"-?([0]|([1-9][0-9]*))")
_B64_RE = re.compile(r"[A-Za-z0-9+/=\s]*")

INT32 = (-2147483648, 2147483647)
INT64 = (-9223372036854775808, 9223372036854775807)
MAX_STRING = 1024 * 1024


def _real_date(v: str) -> str | None:
    """Reject dates the regex lets through but the calendar does not (2023-02-30)."""
    if len(v) >= 10:
        try:
            _dt.date(int(v[0:4]), int(v[5:7]), int(v[8:10]))
        except ValueError:
            return f"'{v}' is not a real calendar date"
    return None


def _string(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if v == "":
        return "must not be empty (leave the element out instead)"
    if len(v) > MAX_STRING:
        return "is longer than 1 MB"
    return None


def _markdown(v: Any) -> str | None:
    return _string(v)


def _code(v: Any) -> str | None:
    err = _string(v)
    if err:
        return err
    if not _CODE_RE.fullmatch(v):
        return f"'{v}' is not a valid code (no leading/trailing whitespace, single spaces only)"
    return None


def _id(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if not _ID_RE.fullmatch(v):
        return f"'{v}' is not a valid id (1-64 of A-Z a-z 0-9 - .)"
    return None


def _uri(v: Any) -> str | None:
    err = _string(v)
    if err:
        return err
    if any(c.isspace() for c in v):
        return f"'{v}' is not a valid URI (contains whitespace)"
    if v.startswith("urn:oid:") and not _OID_RE.fullmatch(v):
        return f"'{v}' is not a valid OID URI"
    if v.startswith("urn:uuid:") and not _UUID_RE.fullmatch(v):
        return f"'{v}' is not a valid UUID URI (lower case hex, 8-4-4-4-12)"
    return None


def _oid(v: Any) -> str | None:
    if not isinstance(v, str) or not _OID_RE.fullmatch(v):
        return f"'{v}' is not a valid oid (urn:oid:…)"
    return None


def _uuid(v: Any) -> str | None:
    if not isinstance(v, str) or not _UUID_RE.fullmatch(v):
        return f"'{v}' is not a valid uuid (urn:uuid:, lower case)"
    return None


def _date(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if not _DATE_RE.fullmatch(v):
        return f"'{v}' is not a valid date (YYYY, YYYY-MM or YYYY-MM-DD)"
    return _real_date(v)


def _datetime(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if not _DATETIME_RE.fullmatch(v):
        if "T" in v and not re.search(r"(Z|[+-]\d\d:\d\d)$", v):
            return f"'{v}' is not a valid dateTime: a time needs a timezone (Z or ±hh:mm)"
        return f"'{v}' is not a valid dateTime"
    return _real_date(v)


def _instant(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if not _INSTANT_RE.fullmatch(v):
        return f"'{v}' is not a valid instant (full date, time to the second and a timezone)"
    return _real_date(v)


def _time(v: Any) -> str | None:
    if not isinstance(v, str) or not _TIME_RE.fullmatch(v):
        return f"'{v}' is not a valid time (hh:mm:ss, no timezone)"
    return None


def _boolean(v: Any) -> str | None:
    if not isinstance(v, bool):
        return "must be a JSON boolean (true or false)"
    return None


def _int_range(v: Any, lo: int, hi: int, name: str) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int):
        if str(v) == "-0":  # the integer syntax has no signed zero (a decimal element keeps it)
            return f"-0 is not a valid {name} (zero has no sign)"
        if isinstance(v, Decimal) and v == v.to_integral_value() and "." not in str(v) and "e" not in str(v).lower():
            v = int(v)
        else:
            return f"must be a JSON number without a fraction ({name})"
    if not lo <= v <= hi:
        return f"{v} is out of range for {name} ({lo}..{hi})"
    return None


def _integer(v: Any) -> str | None:
    return _int_range(v, *INT32, "integer")


def _unsigned(v: Any) -> str | None:
    return _int_range(v, 0, INT32[1], "unsignedInt")


def _positive(v: Any) -> str | None:
    return _int_range(v, 1, INT32[1], "positiveInt")


def _integer64(v: Any) -> str | None:
    if not isinstance(v, str):
        return "integer64 must be a JSON string"
    if not _INT_TEXT_RE.fullmatch(v):
        return f"'{v}' is not a valid integer64"
    if not INT64[0] <= int(v) <= INT64[1]:
        return f"{v} is out of range for integer64"
    return None


def _decimal(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | Decimal):
        return "must be a JSON number"
    if isinstance(v, Decimal) and not v.is_finite():
        return "must be a finite number"
    return None


def _base64(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if not _B64_RE.fullmatch(v):
        return "is not valid base64 (characters outside A-Z a-z 0-9 + / =)"
    compact = "".join(v.split())
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64 (bad length or padding)"
    return None


def _xhtml(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return "must be a non-empty JSON string holding XHTML"
    return None


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "boolean": _boolean, "integer": _integer, "integer64": _integer64, "string": _string,
    "decimal": _decimal, "uri": _uri, "url": _uri, "canonical": _uri, "base64Binary": _base64,
    "instant": _instant, "date": _date, "dateTime": _datetime, "time": _time, "code": _code, "oid": _oid,
    "id": _id, "markdown": _markdown, "unsignedInt": _unsigned, "positiveInt": _positive, "uuid": _uuid,
    "xhtml": _xhtml,
}


def check_primitive(type_code: str, value: Any) -> str | None:
    fn = CHECKS.get(type_code)
    if fn is None:
        return _string(value) if isinstance(value, str) else None
    return fn(value)


def date_bounds(v: str) -> tuple[str, str] | None:
    """Low and high ends of a partial date/dateTime as sortable strings (for lowBoundary/highBoundary)."""
    m = re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?(.*)", v)
    if not m:
        return None
    y, mo, d, rest = m.groups()
    if rest:
        return v, v
    if mo is None:
        return f"{y}-01-01", f"{y}-12-31"
    if d is None:
        import calendar

        last = calendar.monthrange(int(y), int(mo))[1]
        return f"{y}-{mo}-01", f"{y}-{mo}-{last:02d}"
    return v, v
