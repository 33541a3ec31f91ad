"""ValueSet/$expand — type and instance level, GET and POST."""

from __future__ import annotations

from typing import Any

from dhp.errors import bad_request
from dhp.interactions.operations import OperationCall, operation
from dhp.terminology import operations as tx
from dhp.terminology.valueset import Options, RenderOptions

PARAMS = {"url", "valueSet", "valueSetVersion", "filter", "date", "offset", "count", "includeDesignations",
          "designation", "includeDefinition", "activeOnly", "excludeNested", "excludeNotForUI",
          "displayLanguage", "property", "exclude-system", "system-version", "check-system-version",
          "force-system-version", "useSupplement", "context", "contextDirection", "excludePostCoordinated"}


def _canonicals(call: OperationCall, name: str) -> tuple[tuple[str, str], ...]:
    out = []
    for v in call.params.values(name):
        url, bar, version = str(v).partition("|")
        if not bar or not url or not version:
            raise bad_request(f"parameter '{name}' must be system|version, not {v!r}", name)
        out.append((url, version))
    return tuple(out)


@operation("expand", types=("ValueSet",), type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/ValueSet-expand")
async def expand(call: OperationCall) -> dict[str, Any]:
    tx.check_names(call, PARAMS)
    term = tx.engine(call)
    p = call.params
    url = tx.text(call, "url")
    version = tx.text(call, "valueSetVersion")
    inline = tx.resource(call, "valueSet", "ValueSet")
    if call.id is not None:
        if url is not None or inline is not None:
            raise bad_request("an instance-level $expand takes neither 'url' nor 'valueSet'", "url")
        vs: dict[str, Any] | str = await tx.instance(call)
    elif inline is not None:
        if url is not None:
            raise bad_request("give either 'url' or 'valueSet', not both", "url")
        vs = inline
    elif url is not None:
        vs, _, pinned = url.partition("|")
        version = version or pinned or None
    else:
        raise bad_request("$expand needs 'url' or 'valueSet' (or call it on a ValueSet instance)", "url")
    check_versions = _canonicals(call, "check-system-version")
    opts = Options(
        active_only=p.bool("activeOnly") is True,
        exclude_not_for_ui=p.bool("excludeNotForUI") is True,
        system_version=_canonicals(call, "system-version"),
        force_system_version=_canonicals(call, "force-system-version"),
        exclude_system=tuple(str(v) for v in p.values("exclude-system")),
        check_system_version=check_versions,
    )
    count = tx.non_negative(call, "count")
    offset = tx.non_negative(call, "offset") or 0
    text_filter = p.str("filter")
    max_expansion = call.server.settings.max_expansion
    echo: list[dict[str, Any]] = []
    for name, kind in (("displayLanguage", "valueCode"), ("filter", "valueString"), ("count", "valueInteger"),
                       ("offset", "valueInteger"), ("activeOnly", "valueBoolean"),
                       ("includeDesignations", "valueBoolean"), ("excludeNested", "valueBoolean"),
                       ("excludeNotForUI", "valueBoolean")):
        if p.has(name):
            # count/offset echo the checked numbers (p.int is lenient and unbounded)
            value: Any = (count if name == "count" else offset) if kind == "valueInteger" \
                else p.bool(name) if kind == "valueBoolean" else p.str(name)
            echo.append({"name": name, kind: value})
    ro = RenderOptions(
        langs=tx.langs(call),
        text_filter=text_filter,
        offset=offset,
        count=count,
        include_designations=p.bool("includeDesignations") is True,
        designations=tuple(str(v) for v in p.values("designation")),
        properties=tuple(str(v) for v in p.values("property")),
        exclude_nested=p.bool("excludeNested") is not False,
        include_definition=p.bool("includeDefinition") is True,
        max_expansion=max_expansion,
        echo=echo,
    )
    return term.expand(vs, ro, opts, version=version)
