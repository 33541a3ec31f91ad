"""ConceptMap translation (R5 model: group.source/target, element.target.relationship, group.unmapped)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Reading a map backwards turns "narrower" into "broader" and vice versa.
_REVERSED = {
    "source-is-narrower-than-target": "source-is-broader-than-target",
    "source-is-broader-than-target": "source-is-narrower-than-target",
}
# R4-style equivalence codes still found in some maps, read as R5 relationships.
_FROM_EQUIVALENCE = {
    "equal": "equivalent", "equivalent": "equivalent", "relatedto": "related-to", "wider":
    "source-is-narrower-than-target", "subsumes": "source-is-narrower-than-target",
    "narrower": "source-is-broader-than-target", "specializes": "source-is-broader-than-target",
    "inexact": "related-to", "unmatched": "not-related-to", "disjoint": "not-related-to",
}


@dataclass
class Match:
    relationship: str
    system: str | None
    code: str | None
    display: str | None
    version: str | None
    origin: str
    properties: list[dict[str, Any]] = field(default_factory=list)
    depends_on: list[dict[str, Any]] = field(default_factory=list)
    product: list[dict[str, Any]] = field(default_factory=list)

    def to_parameter(self) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"name": "relationship", "valueCode": self.relationship}]
        if self.code is not None:
            coding: dict[str, Any] = {}
            if self.system:
                coding["system"] = self.system
            if self.version:
                coding["version"] = self.version
            coding["code"] = self.code
            if self.display:
                coding["display"] = self.display
            parts.append({"name": "concept", "valueCoding": coding})
        for p in self.properties:
            sub = [{"name": "code", "valueCode": p.get("code")}]
            sub += [{"name": "value", k: v} for k, v in p.items() if k.startswith("value")]
            parts.append({"name": "property", "part": sub})
        for name, deps in (("dependsOn", self.depends_on), ("product", self.product)):
            for d in deps:
                sub = [{"name": "attribute", "valueUri": d.get("attribute")}]
                sub += [{"name": "value", k: v} for k, v in d.items() if k.startswith("value")]
                parts.append({"name": name, "part": sub})
        parts.append({"name": "originMap", "valueUri": self.origin})
        return {"name": "match", "part": parts}


def relationship_of(target: dict[str, Any]) -> str:
    rel = target.get("relationship")
    if isinstance(rel, str):
        return rel
    eq = target.get("equivalence")
    return _FROM_EQUIVALENCE.get(str(eq), "related-to") if eq else "related-to"


def _deps_ok(target: dict[str, Any], dependencies: list[tuple[str, str]]) -> bool:
    if not dependencies or not target.get("dependsOn"):
        return True
    given = dict(dependencies)
    for d in target["dependsOn"]:
        attr = d.get("attribute") or d.get("property")
        if attr in given:
            vals = {str(v.get("code")) if isinstance(v, dict) else str(v)
                    for k, v in d.items() if k.startswith("value")}
            if given[attr] not in vals:
                return False
    return True


def translate(cm: dict[str, Any], system: str, code: str, *, reverse: bool = False,
              target_system: str | None = None, dependencies: list[tuple[str, str]] = (),  # type: ignore[assignment]
              resolve_map: Callable[[str], dict[str, Any] | None] | None = None,
              _seen: set[str] | None = None) -> list[Match]:
    """Matches for ``system#code`` in one map (forward: code is a source code; reverse: a target code)."""
    origin = cm.get("url") or ("ConceptMap/" + str(cm.get("id", "")))
    # Maps consulted in this translation, shared by the whole otherMap walk: each map is followed once, so
    # loops end and fan-out (30 groups each pointing on, 4 maps deep) stays linear, not 30**4 matches.
    seen = _seen if _seen is not None else set()
    seen.add(origin)
    out: list[Match] = []
    for g in cm.get("group") or []:
        if not isinstance(g, dict):
            continue
        src, tgt = g.get("source"), g.get("target")
        src_url = src.split("|", 1)[0] if isinstance(src, str) else None
        tgt_url = tgt.split("|", 1)[0] if isinstance(tgt, str) else None
        tgt_version = tgt.split("|", 1)[1] if isinstance(tgt, str) and "|" in tgt else None
        if reverse:
            if tgt_url != system or (target_system and src_url != target_system):
                continue
            for el in g.get("element") or []:
                for t in el.get("target") or []:
                    if t.get("code") == code and _deps_ok(t, dependencies):
                        rel = relationship_of(t)
                        out.append(Match(_REVERSED.get(rel, rel), src_url, el.get("code"), el.get("display"),
                                         None, origin, list(t.get("property") or []),
                                         list(t.get("dependsOn") or []), list(t.get("product") or [])))
            continue
        if src_url != system or (target_system and tgt_url != target_system):
            continue
        found = False
        for el in g.get("element") or []:
            if el.get("code") != code:
                continue
            found = True
            if el.get("noMap") is True:
                out.append(Match("not-related-to", None, None, None, None, origin))
                continue
            for t in el.get("target") or []:
                if not _deps_ok(t, dependencies):
                    continue
                out.append(Match(relationship_of(t), tgt_url, t.get("code"), t.get("display"), tgt_version,
                                 origin, list(t.get("property") or []), list(t.get("dependsOn") or []),
                                 list(t.get("product") or [])))
        um = g.get("unmapped")
        if not found and isinstance(um, dict):
            mode = um.get("mode")
            rel = um.get("relationship") or "equivalent"
            if mode == "use-source-code":
                out.append(Match(rel, tgt_url, code, None, tgt_version, origin))
            elif mode == "fixed" and um.get("code"):
                out.append(Match(rel, tgt_url, um["code"], um.get("display"), tgt_version, origin))
            elif mode == "other-map" and um.get("otherMap") and resolve_map is not None:
                ref = um["otherMap"]
                other = resolve_map(ref) if ref not in seen and ref.split("|", 1)[0] not in seen else None
                seen.add(ref)
                if other is not None:
                    out.extend(translate(other, system, code, target_system=target_system,
                                         dependencies=dependencies, resolve_map=resolve_map, _seen=seen))
    return out


def map_systems(cm: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Source and target systems named by a map's groups."""
    src: set[str] = set()
    tgt: set[str] = set()
    for g in cm.get("group") or []:
        if isinstance(g, dict):
            if isinstance(g.get("source"), str):
                src.add(g["source"].split("|", 1)[0])
            if isinstance(g.get("target"), str):
                tgt.add(g["target"].split("|", 1)[0])
    return src, tgt


def scope_of(cm: dict[str, Any], which: str) -> str | None:
    for k in (which + "ScopeUri", which + "ScopeCanonical", which + "Uri", which + "Canonical"):
        v = cm.get(k)
        if isinstance(v, str):
            return v.split("|", 1)[0]
    return None
