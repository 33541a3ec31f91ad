"""Parameters whose values other parameters of the same type already index: those values are written once.

R5 defines many parameters as unions or filters of others: Observation ``combo-code`` is
``Observation.code | Observation.component.code`` (the ``code`` and ``component-code`` parameters),
``patient`` is ``Observation.subject.where(resolve() is Patient)`` (``subject``'s rows that point at a
Patient), Patient ``phonetic`` reads ``Patient.name`` exactly like ``name``, and ``name``'s family and given
parts are what ``family`` and ``given`` index. Writing every value once per parameter made a third of an
Observation's index rows and two fifths of a Patient's. Such a parameter writes no rows of its own (or, for
``name`` and ``address``, only the parts no other parameter indexes); a search on it reads its sources' rows.

The relations are found from the compiled expressions (plain paths only), never from a list of names, so they
follow API-created SearchParameters too. Parameters on Resource/DomainResource are never shared: a
system-level search without ``_type`` must find their rows under their own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: A source of a parameter's values: (row code, target type the row must point at, or None).
Source = tuple[str, str | None]

#: HumanName and Address parts: a parameter on the whole element skips the parts others index.
NAME_PARTS = ("family", "given", "prefix", "suffix", "text", "line", "city", "district", "state", "postalCode",
              "country")


@dataclass
class Plan:
    """How one resource type's parameters share rows."""

    #: code → where its values are; the parameter writes no rows.
    shared: dict[str, tuple[Source, ...]] = field(default_factory=dict)
    #: code → (parts it does not write, the parameters that write them): ``name`` → family, given.
    partial: dict[str, tuple[frozenset[str], tuple[str, ...]]] = field(default_factory=dict)

    def sources(self, code: str) -> tuple[Source, ...] | None:
        """Where ``code``'s values are, when not (only) under its own code."""
        got = self.shared.get(code)
        if got is not None:
            return got
        part = self.partial.get(code)
        if part is not None:
            return ((code, None), *((q, None) for q in part[1]))
        return None

    def signature(self, code: str) -> tuple[Any, ...]:
        return (self.shared.get(code), self.partial.get(code))


def plan(entries: list[tuple[str, str, Any]]) -> Plan:
    """The sharing among a type's extractors ((table kind, code, ParamExtractor) each)."""
    paths: dict[str, tuple[str, tuple[Any, ...], tuple[Any, ...]]] = {}  # code → (type, parts, components)
    for _kind, code, ex in entries:
        p = ex.param
        if ex.embedded or p.type == "special" or {"Resource", "DomainResource"} & set(p.base):
            continue
        steps = getattr(ex.root, "steps", None)
        if not steps:
            continue
        comps = tuple((c.expression.strip(), c.type) for c in p.components)
        paths[code] = (p.type, steps, comps)
    # One owner per single-path expression: the first code in order (``name`` before ``phonetic``).
    owner: dict[tuple[Any, ...], str] = {}
    # And per union of several paths (``value-quantity`` = value as Quantity | as SampledData), which a wider
    # union may be made of (``combo-value-quantity`` = ``value-quantity`` | ``component-value-quantity``).
    unions: dict[tuple[Any, ...], str] = {}
    for code in sorted(paths):
        ptype, steps, comps = paths[code]
        if len(steps) == 1:
            owner.setdefault((ptype, steps[0], comps), code)
        elif len(set(steps)) == len(steps):
            unions.setdefault((ptype, frozenset(steps), comps), code)
    # Widest first: a union is covered by as few others as possible.
    by_width = sorted(unions.items(), key=lambda kv: (-len(kv[0][1]), kv[1]))
    out = Plan()
    for code, (ptype, steps, comps) in paths.items():
        if ptype != "string" or len(steps) != 1 or owner.get((ptype, steps[0], comps)) != code:
            continue
        skip = {}
        for k in NAME_PARTS:
            q = owner.get(("string", (*steps[0], ("child", k)), ()))
            if q is not None:
                skip[k] = q
        if skip:
            out.partial[code] = (frozenset(skip), tuple(sorted(set(skip.values()))))

    done: dict[str, tuple[Source, ...] | None] = {}

    def resolve(code: str) -> tuple[Source, ...] | None:
        """Sources of ``code`` when it writes no rows of its own, else None."""
        if code in done:
            return done[code]
        ptype, steps, comps = paths[code]
        srcs: list[Source] = []
        left = list(steps)
        if len(steps) > 1:
            mine = frozenset(steps)
            for (utype, uparts, ucomps), o in by_width:
                if (o != code and utype == ptype and ucomps == comps and uparts <= mine
                        and uparts.issubset(left)):
                    srcs += whole(o)
                    left = [p for p in left if p not in uparts]
        for part in left:
            o = owner.get((ptype, part, comps))
            if o is not None and o != code:
                srcs += whole(o)
                continue
            if (ptype == "reference" and len(part) > 1 and part[-1][0] == "whereref"
                    and (o := owner.get((ptype, part[:-1], comps))) is not None and o != code):
                want = part[-1][1]
                srcs += [(c, want) for c, t in whole(o) if t in (None, want)]
                continue
            done[code] = None
            return None
        done[code] = got = tuple(dict.fromkeys(srcs))
        return got

    def whole(c: str) -> tuple[Source, ...]:
        got = resolve(c)
        if got is None:
            got = out.sources(c)  # its own rows, and a partial parameter's part sources
        return got if got is not None else ((c, None),)

    for code in paths:
        got = resolve(code)
        if got is not None:
            out.shared[code] = got
    return out
