"""Text helpers for terminology: search normalisation and language choice.

Uzbek Latin is written with several apostrophe-like characters (oʻ, o', o‘, o’ for the letter "oʻ", and the
same for "gʻ" and the tutuq belgisi ʼ). Users type whatever their keyboard gives them, so the type-ahead
filter drops all of them on both sides: "Qo'rg'ontepa", "Qoʻrgʻontepa" and "Qorgontepa" all match.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from dhp.httputil import weighted_values

# Apostrophe-like characters seen in Uzbek Latin text (ASCII ', modifier letters, quotes, grave, acute).
_APOSTROPHES = "'ʻʼ‘’`´ʹ′"
# Word separators besides white space. str.replace per character is much faster than str.translate or a
# regular expression on non-ASCII text, which matters when indexing 12,000 concepts at once.
_SEPARATORS = ".,;:()[]{}\"/\\-–—«»„“”!?№#%&*+=<>|~^@$_…"


def normalize(text: str) -> str:
    """Case-folded text with Uzbek apostrophe variants removed and Russian ё folded into е."""
    text = text.casefold()
    for ch in _APOSTROPHES:
        if ch in text:
            text = text.replace(ch, "")
    return text.replace("ё", "е") if "ё" in text else text


def _separate(text: str) -> str:
    for ch in _SEPARATORS:
        if ch in text:
            text = text.replace(ch, " ")
    return text


def words(text: str) -> list[str]:
    """The normalised words of ``text``."""
    return _separate(normalize(text)).split()


def words_many(texts: list[str]) -> list[list[str]]:
    """``words`` of many texts at once (one pass of each string operation over all of them)."""
    big = normalize("\n".join(t.replace("\n", " ") for t in texts))
    return [line.split() for line in _separate(big).split("\n")]


def parse_accept_language(header: str | None) -> list[str]:
    """Language tags from an Accept-Language header, best first (``*`` and q=0 dropped)."""
    if not header:
        return []
    return [t for t in weighted_values(header) if t != "*"]


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


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building big indexes.

    Creating tens of thousands of small objects triggers full collections over the whole heap (which holds
    the loaded packages); that triples the time to index a 12,000-concept code system, for no benefit.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
