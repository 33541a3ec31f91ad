"""FHIR date, dateTime and instant values as ranges of microseconds since the epoch (UTC).

Search indexes and compares dates as these ranges; history's ``_since``/``_at`` and the validator's Period
rule read them too. Integer arithmetic throughout: ``datetime`` overflows at the ends of its range
(``9999-12``, ``0001-01-01T00:00+01:00``), and a value there is as valid as any.
"""

from __future__ import annotations

import functools
import re

#: Open ends of a date range (microseconds since the epoch).
MIN_US = -(2**62)
MAX_US = 2**62

_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")

_DAY = 86_400_000_000
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days(y: int, m: int, d: int) -> int:
    """Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (any year: no overflow at 9999)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _month_days(y: int, m: int) -> int:
    if m == 2 and y % 4 == 0 and (y % 100 != 0 or y % 400 == 0):
        return 29
    return _MONTH_DAYS[m - 1]


class DateError(ValueError):
    pass


@functools.lru_cache(maxsize=65536)
def date_range(text: str) -> tuple[int, int]:
    """The instant range [low, high] (µs, inclusive) a FHIR date/dateTime/instant stands for.

    A value is a range at its own precision: ``2024`` is the whole year, ``2024-03-05T10:00`` a minute.
    Times without a zone are taken as UTC. Integer arithmetic: a range may run past 9999-12-31 (``9999-12``,
    a time zone west of UTC on the last day) or start before 0001-01-01, where ``datetime`` overflows.
    """
    m = _DATE_RE.match(text.strip())
    if not m:
        raise DateError(f"not a FHIR date: {text!r}")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    year = int(y)
    month = int(mo) if mo is not None else 1
    day = int(d) if d is not None else 1
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= _month_days(year, month):
        raise DateError(f"not a valid date: {text!r}")
    lo = _days(year, month, day) * _DAY
    if mo is None:
        return lo, (_days(year + 1, 1, 1) * _DAY - 1 if year < 9999 else MAX_US)
    if d is None:
        return lo, lo + _month_days(year, month) * _DAY - 1
    if hh is None:
        return lo, lo + _DAY - 1
    hour, minute = int(hh), int(mi)
    if hour > 23 or minute > 59:  # seconds may be 60 (a leap second), as FHIR's own pattern allows
        raise DateError(f"not a valid date: {text!r}")
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        lo -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60) * 1_000_000
    lo += (hour * 3600 + minute * 60) * 1_000_000
    if ss is None:
        return lo, lo + 60_000_000 - 1
    lo += int(ss) * 1_000_000
    if frac is None:
        return lo, lo + 1_000_000 - 1
    lo += int(frac[:6].ljust(6, "0"))
    return lo, lo + 10 ** (6 - min(len(frac), 6)) - 1
