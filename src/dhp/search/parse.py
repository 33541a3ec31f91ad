"""Search URL parameters → a :class:`SearchQuery`.

Every malformed value is a 400 naming the parameter. A parameter the server does not know is reported
(an OperationOutcome entry, or 400 under ``Prefer: handling=strict``); a modifier or chain it cannot evaluate
is always a 400, so no search ever answers with unfiltered results.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date, timedelta
from typing import Any

from dhp.errors import FHIRError, Issue
from dhp.instants import DateError, date_range
from dhp.search.params import RESULT_PARAMS, UNSUPPORTED, ParamDef, ParamRegistry
from dhp.search.query import (
    ANY,
    AnyOf,
    Chain,
    Clause,
    CompositeMatch,
    Has,
    IdClause,
    Include,
    LastUpdated,
    ListClause,
    Match,
    NearMatch,
    Node,
    RangeMatch,
    RefMatch,
    RowCode,
    SearchQuery,
    SortKey,
    StringMatch,
    TokenMatch,
    UriMatch,
)
from dhp.search.values import norm, number_range

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"not", "text", "of-type", "code-text", "in", "not-in", "above", "below", "missing"},
    "reference": {"identifier", "missing", "above", "below"},
    "uri": {"above", "below", "missing"},
    "date": {"missing"}, "number": {"missing"}, "quantity": {"missing"}, "composite": {"missing"},
    "special": {"missing"},
}
TABLE_OF = {"string": "string", "token": "token", "reference": "reference", "date": "date", "number": "number",
            "quantity": "quantity", "uri": "uri", "composite": "composite", "special": "near"}
MAX_CHAIN = 6
#: Bundle parameters whose "reference" is the first entry's resource itself.
EMBEDDED = frozenset({"composition", "message"})


#: Result parameters that take one value: a second, different one is refused, not silently preferred.
_SINGLE_RESULT_PARAMS = frozenset({"_count", "_total", "_summary", "_sort"})


def bad(msg: str, param: str, message_id: str = "search-invalid") -> FHIRError:
    return FHIRError(400, msg, "invalid", expression=[param], message_id=message_id)


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a year without one
        return day.replace(year=day.year - years, day=28)


def _age_match(prefix: str, n: int, today: date) -> RangeMatch:
    """The birth dates (as a date search range) of an age of ``n`` whole years today, under ``prefix``."""

    def day(d: date) -> tuple[int, int]:
        return date_range(d.isoformat())

    def window(older: int, younger: int) -> RangeMatch:  # ages younger..older years
        lo = day(_years_before(today, older + 1) + timedelta(days=1))[0]
        return RangeMatch("ne" if prefix == "ne" else "eq", lo, day(_years_before(today, younger))[1], lo)

    if prefix in ("gt", "sa"):  # older than n: born on or before today − (n + 1) years
        return RangeMatch("le", *day(_years_before(today, n + 1)), 0)
    if prefix == "ge":
        return RangeMatch("le", *day(_years_before(today, n)), 0)
    if prefix in ("lt", "eb"):  # younger than n: born after today − n years
        return RangeMatch("gt", *day(_years_before(today, n)), 0)
    if prefix == "le":
        return RangeMatch("gt", *day(_years_before(today, n + 1)), 0)
    if prefix == "ap":  # within 10 %, at least a year
        m = max(1, round(n * 0.1))
        return window(n + m, max(0, n - m))
    return window(n, n)


def refuse_nul(items: list[tuple[str, str]]) -> None:
    """U+0000 cannot be stored in a PostgreSQL text column (nor compared with one), and ``query.ANY`` uses it
    as a sentinel: a search naming it is refused on both backends alike."""
    for name, value in items:
        if "\x00" in name or "\x00" in value:
            clean = name.replace("\x00", "")
            raise bad(f"Search parameter '{clean}' contains a NUL character (U+0000)", clean)


def split_escaped(s: str, sep: str) -> list[str]:
    """Split on ``sep`` not preceded by a backslash; unescaping is left to :func:`unescape`."""
    out, cur, i = [], [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in ",$|\\":
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


class Parser:
    def __init__(self, params: ParamRegistry, *, base_url: str = "", terminology: Any = None,
                 strict: bool = False, default_count: int = 50, max_count: int = 1000,
                 single_valued: Any = None, date_width: Any = None, sources: Any = None) -> None:
        self.params = params
        self.base_url = base_url.rstrip("/")
        self.terminology = terminology
        self.strict = strict
        self.default_count = default_count
        self.max_count = max_count
        self.types = params.resource_types
        self.single_valued = single_valued
        self.date_width = date_width
        #: (type, code) → the rows holding a shared parameter's values (``SearchEngine.sources``).
        self.sources = sources

    # ------------------------------------------------------------------ whole queries

    def parse(self, types: list[str] | None, items: list[tuple[str, str]]) -> SearchQuery:
        """``types`` is [type] for a type search, None for a system search (``_type`` narrows it)."""
        refuse_nul(items)
        q = SearchQuery(types=types or [], count=self.default_count)
        system = types is None
        if system:
            for name, value in items:
                if name == "_type":
                    for t in value.split(","):
                        t = t.strip()
                        if t not in self.types:
                            raise bad(f"Unknown resource type '{t}' in _type", "_type")
                        if t not in q.types:
                            q.types.append(t)
        for name, value in items:
            if name == "_type" and system:
                q.echo.append((name, value))
                continue
            base = name.split(":", 1)[0]
            if base in RESULT_PARAMS or base in ("_type",):
                self._result_param(q, name, value, system)
                continue
            node = self.node_for(q.types if system else types or [], name, value, system=system,
                                 issues=q.issues)
            if node is not None:
                q.nodes.append(node)
                q.echo.append((name, value))
        if types and len(types) == 1:
            q.nodes = self.merge(types[0], q.nodes)
        return q

    def merge(self, rtype: str, nodes: list[Node]) -> list[Node]:
        """``birthdate=ge1980&birthdate=lt1990``: on a single-valued parameter both conditions hold for the
        one row, so they become one index range scan instead of two semi-joins over half the table each."""
        if self.single_valued is None:
            return nodes
        out: list[Node] = []
        first: dict[tuple[str, str], Clause] = {}
        for n in nodes:
            if (isinstance(n, Clause) and not n.negate and n.missing is None
                    and n.table in ("date", "number", "quantity", "string", "uri")
                    and self.single_valued(rtype, n.code)):
                key = (n.table, n.code)
                if key in first:
                    first[key].also.append(n.matches)
                    continue
                first[key] = n
            out.append(n)
        return out

    def nodes(self, rtype: str, items: list[tuple[str, str]]) -> list[Node]:
        """Conditions only (conditional operations, authorisation filters); result parameters are refused."""
        refuse_nul(items)
        out: list[Node] = []
        issues: list[Issue] = []
        for name, value in items:
            base = name.split(":", 1)[0]
            if base in RESULT_PARAMS:
                continue
            n = self.node_for([rtype], name, value, system=False, issues=issues)
            if n is not None:
                out.append(n)
        if issues:
            # A conditional operation on a parameter we cannot evaluate would match too much.
            raise FHIRError(400, issues[0].diagnostics, "not-supported", expression=issues[0].expression,
                            message_id="search-param-unknown")
        return out

    def _ignored(self, issues: list[Issue], name: str, why: str) -> None:
        if self.strict:
            raise FHIRError(400, why, "not-supported", expression=[name], message_id="search-param-unknown")
        issues.append(Issue("warning", "not-supported", why, [name], "search-param-ignored"))

    def node_for(self, types: list[str], name: str, value: str, *, system: bool,
                 issues: list[Issue]) -> Node | None:
        node = self._node_for(types, name, value, system=system, issues=issues)
        return self.share(node, types) if node is not None else None

    def share(self, node: Node, types: list[str]) -> Node:
        """Codes of parameters that read other parameters' index rows become :class:`RowCode` s (see
        ``dhp.search.shared``), in this node and the nodes inside it."""
        if self.sources is None:
            return node
        if isinstance(node, Clause):
            node.code = self.row_code(types, node.code)
        elif isinstance(node, Chain):
            node.code = self.row_code(types, node.code)
            node.subs = {t: [self.share(n, [t]) for n in nodes] for t, nodes in node.subs.items()}
        elif isinstance(node, Has):
            node.ref_code = self.row_code([node.src_type], node.ref_code)
            node.nodes = [self.share(n, [node.src_type]) for n in node.nodes]
        elif isinstance(node, AnyOf):
            node.alternatives = [[self.share(n, types) for n in alt] for alt in node.alternatives]
        return node

    def row_code(self, types: list[str], code: str) -> str:
        if self.sources is None or isinstance(code, RowCode) or not types:
            return code
        if len(types) == 1:
            srcs = self.sources(types[0], code)
            return code if srcs is None else RowCode(code, srcs)
        by = {t: got for t in types if (got := self.sources(t, code)) is not None}
        return RowCode(code, by_type=by) if by else code

    def _node_for(self, types: list[str], name: str, value: str, *, system: bool,
                  issues: list[Issue]) -> Node | None:
        if name.startswith("_has:") or name == "_has":
            if system or len(types) != 1:
                raise bad("_has needs a resource type", name)
            return self._has(types[0], name, value, 0)
        head, _, rest = name.partition(".")
        code, _, modifier = head.partition(":")
        if code in UNSUPPORTED or code == "_in":
            self._ignored(issues, name, f"The search parameter '{code}' is not supported by this server")
            return None
        if system and not code.startswith("_") and not types:
            # Ignoring it would return every resource of every type: refuse instead.
            raise bad(f"'{code}' is not a common parameter: a system-level search needs _type for it", name)
        check_types = types or ["Resource"]
        if code == "_id":
            return self._id(name, modifier, value, rest)
        if code == "_list" and rest:
            raise bad("'_list' is not a reference: it cannot be chained", name)
        if code == "_lastUpdated":
            return self._last_updated(name, modifier, rest, value)
        if code == "_list":
            if modifier:
                raise bad(f"Modifier ':{modifier}' is not allowed on _list", name)
            return ListClause([unescape(v) for v in self._values(value)])
        defs = []
        for t in check_types:
            p = self.params.get(t, code) if t != "Resource" else self.params.get("Patient", code)
            if p is None:
                known = [x for x in check_types if x != "Resource" and self.params.get(x, code) is not None]
                if known:
                    # Ignoring it would answer with every resource of the types that do define it (all Patients
                    # for ``_type=Patient,Observation&gender=male``): a wrong result, not a lenient one.
                    raise bad(f"Search parameter '{code}' is defined for {', '.join(known)} but not for {t}: with "
                              "_type, every parameter must apply to every listed type (search the types "
                              "separately)", name)
                self._ignored(issues, name, f"Unknown search parameter '{code}' for resource type {t}")
                return None
            if p.unevaluable:
                self._ignored(issues, name, f"The search parameter '{code}' is not supported by this server: "
                                            f"{p.unevaluable}")
                return None
            defs.append(p)
        p = defs[0]
        if any(d.type != p.type for d in defs):
            raise bad(f"Search parameter '{code}' has different types across {', '.join(types)}", name)
        return self._param(check_types[0] if not system else None, p, name, modifier, rest, value, 0)

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def _values(value: str) -> list[str]:
        return [v for v in split_escaped(value, ",")]

    @staticmethod
    def _bool(name: str, value: str) -> bool:
        if value not in ("true", "false"):
            raise bad(f"':missing' takes true or false, not '{value}'", name)
        return value == "true"

    def _id(self, name: str, modifier: str, value: str, rest: str) -> Node:
        if rest:
            raise bad("_id cannot be chained", name)
        if modifier == "missing":
            return IdClause([], missing=self._bool(name, value))
        if modifier not in ("", "not"):
            raise bad(f"Modifier ':{modifier}' is not allowed on _id", name)
        return IdClause([unescape(v) for v in self._values(value)], negate=modifier == "not")

    def _param(self, rtype: str | None, p: ParamDef, name: str, modifier: str, rest: str, value: str,
               depth: int) -> Node:
        if p.years_since:
            return self._years_since(rtype, p, name, modifier, rest, value, depth)
        if rest:
            return self._chain(rtype, p, name, modifier, rest, value, depth)
        if (p.type == "special" and p.code != "near") or p.unevaluable:
            why = f": {p.unevaluable}" if p.unevaluable else ""
            raise FHIRError(400, f"The search parameter '{p.code}' is not supported by this server{why}",
                            "not-supported", expression=[name], message_id="search-param-unknown")
        table = TABLE_OF.get(p.type)
        if table is None:
            raise bad(f"Search parameter '{p.code}' has an unknown type '{p.type}'", name)
        if modifier:
            allowed = MODIFIERS.get(p.type, set())
            if modifier not in allowed and not (p.type == "reference" and modifier in self.types):
                raise FHIRError(400, f"Modifier ':{modifier}' is not supported on {p.type} parameter '{p.code}'",
                                "not-supported", expression=[name], message_id="search-modifier-unsupported")
        if modifier == "missing":
            return Clause(table, p.code, missing=self._bool(name, value))
        values = self._values(value)
        if not value:
            raise bad(f"Search parameter '{name}' has no value", name)
        clause = Clause(table, p.code)
        if p.type == "string":
            mode = {"exact": "exact", "contains": "contains"}.get(modifier, "prefix")
            clause.matches = [StringMatch(mode, unescape(v) if mode == "exact" else norm(unescape(v)))
                              for v in values]
        elif p.type == "token":
            clause.negate = modifier in ("not", "not-in")
            clause.matches = [self._token(name, modifier, v) for v in values]
        elif p.type == "reference":
            clause.matches = [self._ref(p, name, modifier, v) for v in values]
        elif p.type in ("date", "number", "quantity"):
            clause.matches = [self._range(p.type, name, v) for v in values]
            width = self.date_width(rtype, p.code) if p.type == "date" and rtype and self.date_width else None
            if width is not None:
                clause.matches = [replace(m, width=width) for m in clause.matches]  # type: ignore[type-var]
        elif p.type == "uri":
            clause.matches = [UriMatch(modifier or "eq", unescape(v)) for v in values]
        elif p.type == "composite":
            clause.matches = [self._composite(p, name, v) for v in values]
        elif p.type == "special":
            clause.matches = [self._near(name, v) for v in values]
        return clause

    def _token(self, name: str, modifier: str, v: str) -> TokenMatch:
        if modifier == "text":
            return TokenMatch(ANY, norm(unescape(v)), "text")
        if modifier == "code-text":
            return TokenMatch(ANY, unescape(v), "code-text")
        parts = split_escaped(v, "|")
        if modifier == "of-type":
            if len(parts) != 3 or not all(parts):
                raise bad(f"':of-type' takes system|code|value, not '{v}'", name)
            ts, tc, val = (unescape(x) for x in parts)
            return TokenMatch(ANY, val, "of-type", type_system=ts, type_code=tc)
        if modifier in ("in", "not-in"):
            codes = self._expand(name, unescape(v))
            return TokenMatch(ANY, None, "set", frozenset(codes))
        if len(parts) > 2:
            raise bad(f"A token is [system|]code, not '{v}'", name)
        if len(parts) == 2:
            system: str | None = unescape(parts[0]) or None
            code = unescape(parts[1]) or None
            if system is None and code is None:
                raise bad(f"Empty token '{v}'", name)
        else:
            system, code = ANY, unescape(parts[0])
        if modifier in ("above", "below"):
            if system in (ANY, None) or code is None:
                raise bad(f"':{modifier}' needs system|code", name)
            assert system is not None
            codes = self._hierarchy(name, modifier, system, code)
            return TokenMatch(ANY, None, "set", frozenset((system, c) for c in codes))
        return TokenMatch(system, code)

    def _need_terminology(self, name: str, what: str) -> Any:
        if self.terminology is None:
            raise FHIRError(400, f"{what} needs the terminology service, which is not available",
                            "not-supported", expression=[name], message_id="search-modifier-unsupported")
        return self.terminology

    def _expand(self, name: str, url: str) -> set[tuple[str | None, str]]:
        term = self._need_terminology(name, f"'{name}'")
        codes = term.expand_codes(url)
        if codes is None:
            raise FHIRError(400, f"The value set '{url}' cannot be expanded here", "not-supported",
                            expression=[name], message_id="search-valueset-unknown")
        return set(codes)

    def _hierarchy(self, name: str, modifier: str, system: str, code: str) -> set[str]:
        term = self._need_terminology(name, f"'{name}'")
        got = term.subsumed_by(system, code) if modifier == "below" else term.ancestors(system, code)
        if got is None:
            raise FHIRError(400, f"The code system '{system}' is not known here", "not-supported",
                            expression=[name], message_id="search-codesystem-unknown")
        return set(got) | {code}

    def _ref(self, p: ParamDef, name: str, modifier: str, v: str) -> RefMatch:
        v = unescape(v)
        if modifier == "identifier":
            parts = v.split("|", 1)
            if len(parts) == 2:
                return RefMatch(None, None, mode="identifier", ident_system=parts[0] or None,
                                ident_value=parts[1])
            return RefMatch(None, None, mode="identifier", ident_value=v)
        if modifier in ("above", "below"):
            return RefMatch(None, None, url=v, mode=modifier)
        if self.base_url and v.startswith(self.base_url + "/"):
            v = v[len(self.base_url) + 1:]
        if "://" in v or v.startswith("urn:"):
            url, _, ver = v.partition("|")
            return RefMatch(None, None, url=url, version=ver or None)
        segs = v.split("/")
        if len(segs) >= 4 and segs[-2] == "_history":
            segs = segs[:-2]
        if len(segs) == 2:
            t, i = segs
            if t not in self.types:
                raise bad(f"'{t}' is not a resource type in reference '{v}'", name)
            if modifier and modifier != t:
                raise bad(f"Reference '{v}' does not match the type modifier ':{modifier}'", name)
            return RefMatch(t, i)
        if len(segs) != 1 or not v:
            raise bad(f"Not a reference: '{v}'", name)
        if modifier:
            return RefMatch(modifier, v)
        if len(p.targets) == 1:
            return RefMatch(p.targets[0], v)
        return RefMatch(None, v)

    def _range(self, ptype: str, name: str, v: str) -> RangeMatch:
        v = unescape(v) if ptype != "quantity" else v
        prefix = "eq"
        if len(v) > 2 and v[:2] in PREFIXES and (v[2].isdigit() or v[2] in "-+."):
            prefix, v = v[:2], v[2:]
        if ptype == "date":
            try:
                lo, hi = date_range(v)
            except DateError:
                raise bad(f"'{v}' is not a valid date for '{name}'", name, "search-bad-date") from None
            return RangeMatch(prefix, lo, hi, lo)
        if ptype == "quantity":
            parts = split_escaped(v, "|")
            if len(parts) not in (1, 3):
                raise bad(f"A quantity is number|system|code, not '{v}'", name)
            num = unescape(parts[0])
            system: str | None = ANY
            code: str | None = None
            if len(parts) == 3:
                system = unescape(parts[1]) or ANY
                code = unescape(parts[2]) or None
        else:
            num = v
        try:
            lo, hi, d = number_range(num)
        except ValueError:
            raise bad(f"'{num}' is not a valid number for '{name}'", name, "search-bad-number") from None
        if ptype == "quantity":
            return RangeMatch(prefix, lo, hi, float(d), system, code)
        return RangeMatch(prefix, lo, hi, float(d))

    def _years_since(self, rtype: str | None, p: ParamDef, name: str, modifier: str, rest: str, value: str,
                     depth: int) -> Node:
        """``age=30``: whole years from a date element (``Patient.birthDate``) to today, searched on the date
        parameter that indexes the element — age N is a date in (today − N − 1 years, today − N years].
        Deceased patients are left out, as the extensions package's definition of ``age`` says."""
        if rest:
            raise bad(f"'{p.code}' cannot be chained", name, "search-bad-chain")
        if modifier:
            raise bad(f"Modifier ':{modifier}' is not allowed on '{p.code}'", name)
        dp = self.params.date_param_of(rtype, p.years_since) if rtype else None
        if dp is None or not dp.indexed:
            raise FHIRError(400, f"The search parameter '{p.code}' is not supported by this server: no date "
                            f"parameter indexes {p.years_since}", "not-supported", expression=[name],
                            message_id="search-param-unknown")
        today = date.today()  # the server's own time zone (TZ): where the platform's day turns
        matches: list[Match] = []
        for v in self._values(value):
            prefix, num = ("eq", v) if v[:2] not in PREFIXES else (v[:2], v[2:])
            if not (num.isascii() and num.isdigit()) or len(num) > 3:
                raise bad(f"'{p.code}' takes whole years (0 to 999) with an optional prefix, not '{v}'", name,
                          "search-bad-number")
            matches.append(_age_match(prefix, int(num), today))
        node: Node = Clause("date", dp.code, matches)
        dead = self.params.get(rtype, "deceased") if rtype == "Patient" else None
        if dead is not None and dead.type == "token" and dead.indexed:
            node = AnyOf([[node, self._param(rtype, dead, name, "not", "", "true", depth)]])
        return node

    def _composite(self, p: ParamDef, name: str, v: str) -> CompositeMatch:
        parts = split_escaped(v, "$")
        comps = p.components
        if len(parts) != len(comps) or len(comps) > 3:
            raise bad(f"'{name}' takes {len(comps)} '$'-separated values, not '{v}'", name)
        out: list[tuple[str, Any]] = []
        for c, part in zip(comps, parts, strict=True):
            if c.type == "token":
                out.append(("token", self._token(name, "", part)))
            elif c.type in ("quantity", "number", "date"):
                out.append((c.type, self._range(c.type, name, part)))
            elif c.type == "string":
                out.append(("string", StringMatch("prefix", norm(unescape(part)))))
            elif c.type == "reference":
                out.append(("reference", self._ref(p, name, "", part)))
            elif c.type == "uri":
                out.append(("uri", UriMatch("eq", unescape(part))))
            else:
                raise FHIRError(400, f"Composite '{p.code}' has a component this server cannot search",
                                "not-supported", expression=[name], message_id="search-param-unknown")
        return CompositeMatch(tuple(out))

    def _near(self, name: str, v: str) -> NearMatch:
        parts = split_escaped(v, "|")
        try:
            lat, lon = float(parts[0]), float(parts[1])
            dist = float(parts[2]) if len(parts) > 2 and parts[2] else 10.0
        except (ValueError, IndexError):
            raise bad(f"'near' takes latitude|longitude|distance|units, not '{v}'", name) from None
        # inf/nan parse as floats, and an infinite latitude made the distance formula raise (a 500).
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0 and 0.0 <= dist < math.inf):
            raise bad(f"'near' takes a latitude in [-90, 90], a longitude in [-180, 180] and a finite, "
                      f"non-negative distance, not '{v}'", name)
        unit = parts[3] if len(parts) > 3 and parts[3] else "km"
        factor = {"km": 1.0, "m": 0.001, "[mi_i]": 1.609344, "mi": 1.609344}.get(unit)
        if factor is None:
            raise bad(f"Unknown distance unit '{unit}' (km, m or [mi_i])", name)
        return NearMatch(lat, lon, dist * factor)

    # ------------------------------------------------------------------ chains and _has

    def _chain(self, rtype: str | None, p: ParamDef, name: str, modifier: str, rest: str, value: str,
               depth: int) -> Node:
        if depth >= MAX_CHAIN:
            raise bad(f"Chain '{name}' is too deep", name)
        if p.type != "reference":
            raise bad(f"'{p.code}' is not a reference parameter and cannot be chained", name, "search-bad-chain")
        if rtype is None:
            raise bad("Chains need a resource type", name)
        if modifier and modifier not in self.types:
            raise bad(f"':{modifier}' is not a resource type in chain '{name}'", name, "search-bad-chain")
        targets = [modifier] if modifier else list(p.targets) or sorted(self.types)
        head, _, more = rest.partition(".")
        code, _, mod2 = head.partition(":")
        if rtype == "Bundle" and p.code in EMBEDDED:
            return self._embedded_chain(p, name, targets, code, mod2, more, value, depth)
        subs: dict[str, list[Node]] = {}
        for t in targets:
            if code == "_id":
                subs[t] = [self._id(name, mod2, value, more)]
                continue
            if code == "_lastUpdated":
                subs[t] = [self._last_updated(name, mod2, more, value)]
                continue
            if code.startswith("_has"):
                raise bad("_has cannot follow a chain", name, "search-bad-chain")
            tp = self.params.get(t, code)
            if tp is None:
                continue
            subs[t] = [self._param(t, tp, name, mod2, more, value, depth + 1)]
        if not subs:
            raise bad(f"No target of '{p.code}' ({', '.join(targets[:8])}) has a search parameter '{code}'",
                      name, "search-bad-chain")
        return Chain(p.code, subs)

    def _last_updated(self, name: str, modifier: str, rest: str, value: str) -> Node:
        """``_lastUpdated`` wherever it appears (directly, at the end of a chain, inside ``_has``)."""
        if rest:
            raise bad("'_lastUpdated' is not a reference: it cannot be chained", name, "search-bad-chain")
        if modifier and modifier != "missing":
            raise bad(f"Modifier ':{modifier}' is not allowed on _lastUpdated", name)
        if modifier == "missing":
            return IdClause([], missing=self._bool(name, value))
        return LastUpdated([self._range("date", name, v) for v in self._values(value)])  # type: ignore[misc]

    def _embedded_chain(self, p: ParamDef, name: str, targets: list[str], code: str, mod: str, more: str,
                        value: str, depth: int) -> Node:
        """``Bundle?composition.type=…``: the embedded resource's rows live on the Bundle as "composition.type"."""
        for t in targets:
            tp = self.params.get(t, code)
            if tp is None:
                continue
            node = self._param(t, tp, name, mod, more, value, depth + 1)
            if isinstance(node, Clause | Chain):
                node.code = f"{p.code}.{node.code}"
                return node
        raise bad(f"'{name}' cannot be searched: {'/'.join(targets)} has no parameter '{code}' to chain to",
                  name, "search-bad-chain")

    def _has(self, rtype: str, name: str, value: str, depth: int) -> Node:
        if depth >= MAX_CHAIN:
            raise bad(f"'{name}' nests _has too deeply", name)
        parts = name.split(":", 3)
        if len(parts) < 4 or parts[0] != "_has":
            raise bad(f"_has takes _has:Type:reference:parameter, not '{name}'", name, "search-bad-chain")
        _, src, ref, rest = parts
        if src not in self.types:
            raise bad(f"'{src}' is not a resource type in '{name}'", name, "search-bad-chain")
        rp = self.params.get(src, ref)
        if rp is None or rp.type != "reference":
            raise bad(f"'{ref}' is not a reference parameter of {src}", name, "search-bad-chain")
        if rp.targets and rtype not in rp.targets:
            raise bad(f"{src}.{ref} cannot point at {rtype}", name, "search-bad-chain")
        if rest.startswith("_has:"):
            inner = self._has(src, rest, value, depth + 1)
        else:
            head, _, more = rest.partition(".")
            code, _, mod = head.partition(":")
            if code == "_id":
                inner = self._id(name, mod, value, more)
            elif code == "_lastUpdated":
                inner = self._last_updated(name, mod, more, value)
            else:
                p = self.params.get(src, code)
                if p is None:
                    raise bad(f"Unknown search parameter '{code}' for {src} in '{name}'", name,
                              "search-bad-chain")
                inner = self._param(src, p, name, mod, more, value, depth + 1)
        return Has(src, ref, [inner])

    # ------------------------------------------------------------------ result parameters

    def _result_param(self, q: SearchQuery, name: str, value: str, system: bool) -> None:
        base, _, mod = name.partition(":")
        if base in _SINGLE_RESULT_PARAMS and any(k == name and v != value for k, v in q.echo):
            # Two different answers to one question (say _count in the URL and in a POST body): which one
            # the client meant is a guess, and the losing one used to vanish without a word.
            raise bad(f"{name} is given more than once with different values", name)
        if base == "_count":
            try:
                n = int(value)
            except ValueError:
                raise bad(f"_count must be a whole number, not '{value}'", "_count") from None
            if n < 0:
                raise bad("_count cannot be negative", "_count")
            q.count = min(n, self.max_count)
        elif base == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise bad(f"_total is none, estimate or accurate, not '{value}'", "_total")
            q.total = value
        elif base == "_summary":
            if value not in ("true", "false", "text", "data", "count"):
                raise bad(f"_summary is true, false, text, data or count, not '{value}'", "_summary")
            q.summary = value
        elif base == "_elements":
            # Repeats add up, like the comma-separated list.
            q.elements = (q.elements or []) + [e.strip() for e in value.split(",") if e.strip()]
        elif base == "_sort":
            q.sort = self._sort(q.types, value)
        elif base in ("_include", "_revinclude"):
            if mod not in ("", "iterate", "recurse"):
                raise bad(f"Unknown modifier '{name}'", name)
            q.includes.append(self._include(q.types, value, base == "_revinclude", bool(mod)))
        elif base in ("_format", "_pretty", "_cursor", "_type"):
            return
        else:
            self._ignored(q.issues, name, f"The result parameter '{base}' is not supported by this server")
            return
        q.echo.append((name, value))

    def _sort(self, types: list[str], value: str) -> list[SortKey]:
        keys = []
        for raw in value.split(","):
            raw = raw.strip()
            if not raw:
                continue
            desc = raw.startswith("-")
            code = raw[1:] if desc else raw
            if not code or code.startswith("-"):
                raise bad(f"'{raw}' in _sort is not [-]parameter", "_sort")
            if code in ("_id", "_lastUpdated"):
                keys.append(SortKey(code, code, desc))
                continue
            if not types:
                raise bad(f"Sorting on '{code}' needs a resource type", "_sort")
            p = self.params.get(types[0], code)
            if p is None:
                raise bad(f"Unknown search parameter '{code}' in _sort", "_sort")
            if p.type in ("composite", "special"):
                raise bad(f"Cannot sort on {p.type} parameter '{code}'", "_sort")
            if p.unevaluable:
                raise bad(f"Cannot sort on '{code}': {p.unevaluable}", "_sort")
            if p.years_since:  # the older first is the earlier date first
                dp = self.params.date_param_of(types[0], p.years_since)
                if dp is None or not dp.indexed:
                    raise bad(f"Cannot sort on '{code}': no date parameter indexes {p.years_since}", "_sort")
                single = bool(self.single_valued and len(types) == 1 and self.single_valued(types[0], dp.code))
                keys.append(SortKey("date", self.row_code(types, dp.code), not desc, single))
                continue
            single = bool(self.single_valued and len(types) == 1 and self.single_valued(types[0], code))
            keys.append(SortKey(TABLE_OF[p.type], self.row_code(types, code), desc, single))
        return keys

    def _include(self, types: list[str], value: str, reverse: bool, iterate: bool) -> Include:
        pname = "_revinclude" if reverse else "_include"
        if value == "*":
            return Include("*", "*", None, iterate, reverse)
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise bad(f"{pname} takes Type:parameter[:targetType], not '{value}'", pname)
        src, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if src not in self.types:
            raise bad(f"'{src}' is not a resource type in {pname}", pname)
        if target is not None and target not in self.types:
            raise bad(f"'{target}' is not a resource type in {pname}", pname)
        if code != "*":
            p = self.params.get(src, code)
            if p is None or p.type != "reference":
                raise bad(f"'{code}' is not a reference parameter of {src}", pname)
        return Include(src, self.row_code([src], code) if code != "*" else code, target, iterate, reverse)
