"""Value conversions shared by indexing and querying: string normalisation, number precision (date ranges:
:mod:`dhp.instants`)."""

from __future__ import annotations

import functools
import unicodedata
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation

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


def number_range(text: str) -> tuple[float, float, Decimal]:
    """A search number's implied range from its precision (half a unit of its last digit): ``100`` is
    [99.5, 100.5); ``1e2``, one significant figure, is [50, 150) (the spec's table prints [95, 105), which is
    two figures' range and contradicts its own "1 significant figure")."""
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a number: {text!r}")
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    # The default context overflows (InvalidOperation) past 10^999999: ``1e999999999`` is still a number,
    # beyond float range like ``1e400``, so the bounds become infinities or zeros as they do there.
    ctx = _WIDE
    half = Decimal(5).scaleb(exp - 1, context=ctx)
    return float(ctx.subtract(d, half)), float(ctx.add(d, half)), d


#: Exponents as wide as ``decimal`` allows, so arithmetic on a parsed search number never overflows.
_WIDE = Context(prec=60, Emax=MAX_EMAX, Emin=MIN_EMIN)


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
