"""The small interface validation and search use to ask terminology questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class CodeCheck:
    """Answer to "is this code valid (in this value set)?".

    ``result`` is None when the question could not be answered here (code system not loaded, value set
    unknown): callers report that as "not checked", never as a pass or a failure.
    """

    result: bool | None
    message: str = ""
    display: str | None = None  # the code's preferred display, when known
    system_known: bool = True
    issues: tuple[str, ...] = field(default=())


class CodeValidator(Protocol):
    def validate_code(self, system: str | None, code: str, valueset: str | None = None, *,
                      display: str | None = None, version: str | None = None) -> CodeCheck: ...
