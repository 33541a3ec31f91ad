"""Vetting of regular expressions that come from clients or stored definitions before they run.

Python's backtracking ``re`` engine has no timeout: nested or ambiguous repeats take exponential time and many
``.*`` high polynomial time per string, and both the terminology service (ValueSet ``regex`` filters) and the
validator (FHIRPath ``matches()`` / ``replaceMatches()`` in profile invariants) run them on the event loop. One
``(a+)+$`` froze the whole server. Patterns with such shapes are refused instead of run; the rest are linear
enough in practice (callers add their own time budget where they loop over many strings).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

try:  # Python 3.11+: the parser moved; sre_parse still works but warns
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]

#: More unbounded repeats than this (``.*a.*b.*c.*d``) is polynomial time of a high degree.
MAX_UNBOUNDED = 3
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})


def parsed_risk(items: Any, in_repeat: bool, counts: list[int]) -> str | None:
    """Why the parsed pattern ``items`` may backtrack catastrophically (None: it may not); ``counts[0]``
    accumulates the number of unbounded repeats seen."""
    for op, av in items:
        name = str(op)
        if name in _REPEATS:
            lo, hi, sub = av
            variable = lo != hi
            if hi == _sre.MAXREPEAT or hi > 1000:
                counts[0] += 1
            if in_repeat and variable:
                return "a repeat inside a repeat"
            why = parsed_risk(sub, in_repeat or hi > 1, counts)
        elif name == "SUBPATTERN":
            why = parsed_risk(av[3], in_repeat, counts)
        elif name == "BRANCH":
            if in_repeat:
                return "alternatives inside a repeat"
            why = next((w for b in av[1] if (w := parsed_risk(b, in_repeat, counts))), None)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "a back-reference"
        elif name in ("ASSERT", "ASSERT_NOT"):
            why = parsed_risk(av[1], in_repeat, counts)
        elif name == "ATOMIC_GROUP":
            why = parsed_risk(av, in_repeat, counts)
        else:
            why = None
        if why:
            return why
    return None


class RiskyRegex(ValueError):
    """A pattern refused before it runs: not valid, or shaped so that matching may take very long."""

    def __init__(self, pattern: str, why: str) -> None:
        super().__init__(f"regex {pattern!r} {why}")
        self.pattern = pattern
        self.why = why


def regex_risk(pattern: str) -> str | None:
    """Why ``pattern`` is refused (a phrase to follow "regex '…'"), or None when it may run."""
    try:
        parsed = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"is not valid: {e}"
    counts = [0]
    why = parsed_risk(parsed, False, counts)
    if why is None and counts[0] > MAX_UNBOUNDED:
        why = f"more than {MAX_UNBOUNDED} unbounded repeats"
    if why:
        return f"is refused: it has {why}, which can take very long to match"
    return None


_state = threading.local()


def set_trusted(trusted: bool) -> bool:
    """Let :func:`vetted` compile any valid pattern (True, the default) or vet it first (False) for the
    evaluations that follow on this thread; returns the previous setting, to be restored. The validator turns
    vetting on around the invariants of definitions written through the API; patterns from installed packages
    (the core ``eld-19``, with a repeat inside a repeat that a literal separator makes safe) are trusted, and
    the common case pays nothing."""
    prev: bool = getattr(_state, "trusted", True)
    _state.trusted = trusted
    return prev


def vetted(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """``pattern`` compiled, vetted first unless trusted; raises :class:`RiskyRegex` instead of returning a
    risky one."""
    if getattr(_state, "trusted", True):
        return re.compile(pattern, flags)
    return _vetted(pattern, flags)


@lru_cache(maxsize=1024)
def _vetted(pattern: str, flags: int) -> re.Pattern[str]:
    why = regex_risk(pattern)
    if why is None:
        try:
            return re.compile(pattern, flags)
        except (re.error, RecursionError, OverflowError) as e:
            why = f"is not valid: {e}"
    raise RiskyRegex(pattern, why)
