"""``_summary`` and ``_elements``: cut a resource down to what the client asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dhp.errors import bad_request

if TYPE_CHECKING:
    from dhp.interactions.context import Server

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = ("resourceType", "id", "meta")
SUMMARY_VALUES = ("true", "false", "text", "data", "count")


def _top_level(server: Server, rtype: str) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(summary element names, mandatory element names, choice base → its typed names) at the top level
    of a resource type."""
    cache: dict[str, tuple[set[str], set[str], dict[str, set[str]]]] = server.__dict__.setdefault(
        "_shape_cache", {})
    if rtype in cache:
        return cache[rtype]
    sd = server.registry.structure_definition(rtype)
    summary: set[str] = set()
    mandatory: set[str] = set()
    choices: dict[str, set[str]] = {}
    for el in (sd or {}).get("snapshot", {}).get("element", []):
        path = el.get("path", "")
        parts = path.split(".")
        if len(parts) != 2:
            continue
        name = parts[1]
        names = {name}
        if name.endswith("[x]"):
            base = name[:-3]
            names = {base + t.get("code", "")[:1].upper() + t.get("code", "")[1:] for t in el.get("type", [])}
            choices[base] = choices[name] = names
        if el.get("isSummary"):
            summary |= names
        if el.get("min", 0) > 0:
            mandatory |= names
    cache[rtype] = (summary, mandatory, choices)
    return cache[rtype]


def _element_name(rtype: str, raw: str) -> str | None:
    """The top-level element an ``_elements`` entry names for ``rtype`` (None: it is for another type).

    ``Patient.name`` applies to Patients only; a deeper path (``name.family``) keeps its whole top-level
    element, since returning more than asked is allowed but dropping asked-for data is not."""
    parts = raw.strip().split(".")
    if len(parts) > 1 and parts[0][:1].isupper():
        if parts[0] != rtype:
            return None
        parts = parts[1:]
    return parts[0] or None


def _mark(res: dict[str, Any]) -> None:
    meta = dict(res.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(t.get("code") == "SUBSETTED" for t in tags if isinstance(t, dict)):
        tags.append(dict(SUBSETTED))
    meta["tag"] = tags
    res["meta"] = meta


def shape_resource(server: Server, resource: dict[str, Any], summary: str | None,
                   elements: list[str] | None) -> dict[str, Any]:
    """A copy of ``resource`` reduced per ``_summary`` / ``_elements`` (tagged SUBSETTED when reduced)."""
    if summary in (None, "false") and not elements:
        return resource
    rtype = resource.get("resourceType", "")
    if summary not in (None, "false", "true", "text", "data", "count"):
        raise bad_request(f"_summary must be one of true, false, text, data, count; not {summary!r}", "_summary")
    if summary == "data":
        out = {k: v for k, v in resource.items() if k != "text"}
        _mark(out)
        return out
    sumset, mandatory, choices = _top_level(server, rtype)
    if summary == "true":
        keep = set(_ALWAYS) | sumset
    elif summary == "text":
        keep = set(_ALWAYS) | {"text"} | mandatory
    else:
        keep = set(_ALWAYS) | mandatory
        for raw in elements or []:
            e = _element_name(rtype, raw)
            if e is None:
                continue
            keep.add(e)
            # ``value`` / ``value[x]`` name a choice element, stored as ``valueQuantity`` etc.
            keep |= choices.get(e, set())
    out = {k: v for k, v in resource.items() if k in keep or (k.startswith("_") and k[1:] in keep)}
    # Contained resources stay when anything kept may point at them.
    if "contained" in resource and ("contained" in keep or summary is None):
        out["contained"] = resource["contained"]
    _mark(out)
    return out
