"""Value conversions shared by indexing and querying: string normalisation, date ranges, number precision."""

from __future__ import annotations

import calendar
import functools
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

#: Open ends of a date range (microseconds since the epoch).
MIN_US = -(2**62)
MAX_US = 2**62

# Uzbek Latin writes oʻ/gʻ with a turned comma (U+02BB); people type ', ‘, ’, ` or ʼ instead.
_APOSTROPHES = dict.fromkeys(map(ord, "ʻʼ‘’`´ʹ′"), "'")


@functools.lru_cache(maxsize=65536)
def norm(s: str) -> str:
    """Case-, accent- and apostrophe-insensitive form used for string search (Latin and Cyrillic)."""
    s = s.translate(_APOSTROPHES).casefold()
    if s.isascii():
        return s
    # Strip accents from Latin letters but keep Cyrillic letters whole (й, ё, ў are letters of their own).
    out: list[str] = []
    for ch in unicodedata.normalize("NFD", s):
        if unicodedata.combining(ch):
            if out and "\u0400" <= out[-1][0] <= "\u04ff":
                out[-1] = unicodedata.normalize("NFC", out[-1] + ch)
            continue
        out.append(ch)
    return "".join(out)


_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(dt: datetime) -> int:
    d = dt - _EPOCH
    return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds


class DateError(ValueError):
    pass


@functools.lru_cache(maxsize=65536)
def date_range(text: str) -> tuple[int, int]:
    """The instant range [low, high] (µs, inclusive) a FHIR date/dateTime/instant stands for.

    A value is a range at its own precision: ``2024`` is the whole year, ``2024-03-05T10:00`` a minute.
    Times without a zone are taken as UTC.
    """
    m = _DATE_RE.match(text.strip())
    if not m:
        raise DateError(f"not a FHIR date: {text!r}")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        year = int(y)
        if mo is None:
            lo = datetime(year, 1, 1, tzinfo=UTC)
            hi = datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else None
        elif d is None:
            month = int(mo)
            lo = datetime(year, month, 1, tzinfo=UTC)
            hi = lo + timedelta(days=calendar.monthrange(year, month)[1])
        elif hh is None:
            lo = datetime(year, int(mo), int(d), tzinfo=UTC)
            hi = lo + timedelta(days=1)
        else:
            offset = timedelta(0)
            if tz and tz != "Z":
                sign = 1 if tz[0] == "+" else -1
                offset = sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
            if int(hh) == 24:
                raise DateError(f"not a FHIR date: {text!r}")
            base = datetime(year, int(mo), int(d), int(hh), int(mi), tzinfo=UTC) - offset
            if ss is None:
                lo, hi = base, base + timedelta(minutes=1)
            elif frac is None:
                lo = base + timedelta(seconds=int(ss))
                hi = lo + timedelta(seconds=1)
            else:
                digits = min(len(frac), 6)
                us = int(frac[:6].ljust(6, "0"))
                lo = base + timedelta(seconds=int(ss), microseconds=us)
                hi = lo + timedelta(microseconds=10 ** (6 - digits))
    except ValueError as e:
        raise DateError(f"not a valid date: {text!r}") from e
    return _us(lo), (_us(hi) - 1 if hi is not None else MAX_US)


def number_range(text: str) -> tuple[float, float, Decimal]:
    """A search number's implied range from its precision: ``100`` is [99.5, 100.5), ``1e2`` too."""
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a number: {text!r}")
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    half = Decimal(5).scaleb(exp - 1)
    return float(d - half), float(d + half), d


#: Python types of FHIR numbers; a tuple, since ``int | float | Decimal`` in isinstance is built on every call.
NUMBER_TYPES = (int, float, Decimal)


def to_float(v: object) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, NUMBER_TYPES):
        return float(v)
    if isinstance(v, str):
        try:
            return float(Decimal(v))
        except InvalidOperation:
            return None
    return None
