"""Small HTTP helpers shared by the API, terminology and documents."""

from __future__ import annotations


def weighted_values(header: str | None) -> list[str]:
    """The values of an Accept-style header (``a;q=0.5, b``), best first; ``q=0`` values dropped.

    Values are lower-cased; parameters other than ``q`` are dropped. Equal weights keep header order.
    """
    if not header:
        return []
    weighted: list[tuple[float, int, str]] = []
    for i, part in enumerate(header.split(",")):
        bits = [b.strip() for b in part.split(";")]
        value = bits[0].lower()
        if not value:
            continue
        q = 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            weighted.append((-q, i, value))
    return [v for _, _, v in sorted(weighted)]
