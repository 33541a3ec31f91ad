"""UCUM unit codes, checked against the UCUM grammar (ucumvert's Lark grammar, built from ucum-essence.xml).

Parsing one code takes about a millisecond, so answers are cached: real data uses a few hundred units.
ucumvert pulls in pint on import (~0.4 s), so it is imported on the first UCUM question, not at start-up.
"""

from __future__ import annotations

import threading
from typing import Any

UCUM = "http://unitsofmeasure.org"

_parser: Any = None
_lock = threading.Lock()
_cache: dict[str, str | None] = {}
_CACHE_MAX = 50_000


def _get_parser() -> Any:
    global _parser
    if _parser is None:
        with _lock:
            if _parser is None:
                from ucumvert import get_ucum_parser

                _parser = get_ucum_parser()
    return _parser


def check(code: str) -> str | None:
    """None when ``code`` is a valid UCUM expression, else a short reason."""
    got = _cache.get(code, False)
    if got is not False:
        return got  # type: ignore[return-value]
    reason: str | None
    if not code or code != code.strip() or len(code) > 200:
        reason = "empty, padded or over-long unit code"
    else:
        try:
            _get_parser().parse(code)
            reason = None
        except Exception as e:  # lark raises several error types; any of them means "not UCUM"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[code] = reason
    return reason
