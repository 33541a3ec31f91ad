"""The CapabilityStatement, generated from what this server really supports."""

from __future__ import annotations

from typing import Any

from dhp import __version__
from dhp.interactions import crud
from dhp.interactions.context import Server
from dhp.interactions.operations import OPERATIONS, load_all
from dhp.store import now_us

DHP_CAPABILITY = "https://dhp.uz/fhir/core/CapabilityStatement/DHPCapabilityStatement"
_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create"]


def _profiles_by_type(server: Server) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in server.registry.iter_meta("StructureDefinition"):
        if m.get("derivation") == "constraint" and m.get("kind") == "resource" and m.get("url"):
            out.setdefault(str(m.get("type")), []).append(str(m["url"]))
    return out


def capability_statement(server: Server, base_url: str) -> dict[str, Any]:
    load_all()
    profiles = _profiles_by_type(server)
    search_params: dict[str, list[dict[str, Any]]] = {}
    if server.search is not None and hasattr(server.search, "capability_params"):
        search_params = server.search.capability_params()
    resources = []
    for rtype in sorted(server.registry.resource_types()):
        r: dict[str, Any] = {"type": rtype,
                             "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}"}
        if rtype in profiles:
            r["supportedProfile"] = sorted(profiles[rtype])
        r["interaction"] = [{"code": c} for c in _INTERACTIONS]
        if server.search is not None:
            r["interaction"].append({"code": "search-type"})
        r.update({"versioning": "versioned-update", "readHistory": True, "updateCreate": True,
                  "conditionalCreate": True, "conditionalRead": "not-supported",
                  "conditionalUpdate": server.search is not None,
                  "conditionalDelete": "single" if server.search is not None else "not-supported",
                  "referencePolicy": ["literal", "logical", "local"]})
        if search_params.get(rtype):
            r["searchParam"] = search_params[rtype]
        ops = []
        for name, defs in sorted(OPERATIONS.items()):
            for d in defs:
                if (d.types is None or rtype in d.types) and (d.type_level or d.instance):
                    op: dict[str, Any] = {"name": name}
                    op["definition"] = d.definition or f"http://hl7.org/fhir/OperationDefinition/{rtype}-{name}"
                    ops.append(op)
                    break
        if ops:
            r["operation"] = ops
        resources.append(r)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "DHP FHIR R5 API. JSON only; weak ETags; If-Match on updates"
        + (" (required)" if server.settings.require_if_match else "") + ".",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}]
        + ([{"code": "search-system"}] if server.search is not None else []),
    }
    system_ops = [{"name": n, "definition": d.definition or f"http://hl7.org/fhir/OperationDefinition/{n}"}
                  for n, defs in sorted(OPERATIONS.items()) for d in defs if d.system]
    if system_ops:
        rest["operation"] = system_ops
    if server.auth is not None and hasattr(server.auth, "security_component"):
        rest["security"] = server.auth.security_component(base_url)
    return {
        "resourceType": "CapabilityStatement",
        "id": "dhp-server",
        "url": f"{base_url}/metadata",
        "name": "DHPServer",
        "title": "DHP FHIR server",
        "status": "active",
        "experimental": False,
        "date": crud.instant(now_us()),
        "publisher": "DHP",
        "kind": "instance",
        "instantiates": [DHP_CAPABILITY],
        "software": {"name": "DHP", "version": __version__},
        "implementation": {"description": "DHP — Uzbekistan Digital Health Platform", "url": base_url},
        "fhirVersion": server.registry.fhir_version(),
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "implementationGuide": [p.canonical + "/ImplementationGuide/" + p.id for p in server.registry.packages
                                if p.id.startswith("uz.")],
        "rest": [rest],
    }
