"""Text helpers for terminology: search normalisation and language choice.

Uzbek Latin is written with several apostrophe-like characters (oʻ, o', o‘, o’ for the letter "oʻ", and the
same for "gʻ" and the tutuq belgisi ʼ). Users type whatever their keyboard gives them, so the type-ahead
filter drops all of them on both sides: "Qo'rg'ontepa", "Qoʻrgʻontepa" and "Qorgontepa" all match.
"""

from __future__ import annotations

import re

# Apostrophe-like characters seen in Uzbek Latin text (ASCII ', modifier letters, quotes, grave, acute).
_APOSTROPHES = "'ʻʼ‘’`´ʹ′"
_DROP = str.maketrans({c: None for c in _APOSTROPHES} | {"ё": "е"})
_SPLIT = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Case-folded text with Uzbek apostrophe variants removed and Russian ё folded into е."""
    return text.casefold().translate(_DROP)


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (separators: anything not a letter or digit)."""
    return [w for w in _SPLIT.split(normalize(text)) if w]


def parse_accept_language(header: str | None) -> list[str]:
    """Language tags from an Accept-Language header, best first (``*`` and q=0 dropped)."""
    if not header:
        return []
    weighted: list[tuple[float, int, str]] = []
    for i, part in enumerate(header.split(",")):
        bits = [b.strip() for b in part.split(";")]
        tag = bits[0].lower()
        if not tag or tag == "*":
            continue
        q = 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            weighted.append((-q, i, tag))
    return [t for _, _, t in sorted(weighted)]


def language_list(display_language: str | None, accept_language: str | None) -> tuple[str, ...]:
    """The languages to try for displays: ``displayLanguage`` wins over Accept-Language.

    Each tag is followed by its primary subtag (``uz-Latn-UZ`` → ``uz-latn-uz``, ``uz``), duplicates dropped.
    """
    tags = parse_accept_language(display_language) if display_language else []
    if not tags:
        tags = parse_accept_language(accept_language)
    out: list[str] = []
    for t in tags:
        for cand in (t, t.split("-", 1)[0]):
            if cand not in out:
                out.append(cand)
    return tuple(out)
