"""ConceptMap/$translate — type and instance level, GET and POST; R5 parameters (and the R4 names)."""

from __future__ import annotations

from typing import Any

from dhp.errors import FHIRError, bad_request
from dhp.interactions.operations import OperationCall, operation
from dhp.terminology import operations as tx

PARAMS = {"url", "conceptMap", "conceptMapVersion", "sourceCode", "system", "version", "sourceScope",
          "sourceCoding", "sourceCodeableConcept", "targetCode", "targetCoding", "targetCodeableConcept",
          "targetScope", "targetSystem", "dependency", "useSupplement",
          # R4 names, still sent by many clients
          "code", "coding", "codeableConcept", "source", "target", "reverse"}


def _first_coding(call: OperationCall, code_name: str, coding_name: str, cc_name: str) -> dict[str, Any] | None:
    code = tx.text(call, code_name)
    coding = tx.coding(call, coding_name)
    cc = tx.codeable(call, cc_name)
    given = [x for x in (code, coding, cc) if x is not None]
    if len(given) > 1:
        raise bad_request(f"give only one of '{code_name}', '{coding_name}' or '{cc_name}'", code_name)
    if code is not None:
        return {"system": call.params.str("system"), "code": code}
    if coding is not None:
        return coding
    if cc is not None:
        codings = [c for c in cc.get("coding") or [] if isinstance(c, dict) and isinstance(c.get("code"), str)]
        if not codings:
            raise bad_request(f"'{cc_name}' has no coding with a code", cc_name)
        return {"codings": codings}
    return None


@operation("translate", types=("ConceptMap",), type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/ConceptMap-translate")
async def translate(call: OperationCall) -> dict[str, Any]:
    tx.check_names(call, PARAMS)
    term = tx.engine(call)
    p = call.params
    url = tx.text(call, "url")
    inline = tx.resource(call, "conceptMap", "ConceptMap")
    maps: list[dict[str, Any]] | None = None
    if call.id is not None:
        if url is not None or inline is not None:
            raise bad_request("an instance-level $translate takes neither 'url' nor 'conceptMap'", "url")
        maps = [await tx.instance(call)]
    elif inline is not None:
        if url is not None:
            raise bad_request("give either 'url' or 'conceptMap', not both", "url")
        maps = [inline]
    elif url is not None:
        cm = term.concept_map(url.partition("|")[0], p.str("conceptMapVersion") or url.partition("|")[2] or None)
        if cm is None:
            raise FHIRError(404, f"ConceptMap {url} is not known here", "not-found", expression="url",
                            message_id="cm-unknown")
        maps = [cm]
    source = _first_coding(call, "sourceCode", "sourceCoding", "sourceCodeableConcept") or \
        _first_coding(call, "code", "coding", "codeableConcept")
    target = _first_coding(call, "targetCode", "targetCoding", "targetCodeableConcept")
    reverse = p.bool("reverse") is True
    if source is not None and target is not None:
        raise bad_request("give a source code (to translate) or a target code (to translate back), not both",
                          "targetCode")
    if source is None and target is None:
        raise bad_request("$translate needs sourceCode+system, sourceCoding or sourceCodeableConcept "
                          "(or targetCode+system … for the reverse direction)", "sourceCode",
                          message_id="param-code-missing")
    if target is not None:
        reverse = True
    given = target if target is not None else source
    assert given is not None
    codings = given.get("codings") or [given]
    target_system = tx.text(call, "targetSystem")
    deps: list[tuple[str, str]] = []
    for d in tx.parts(call, "dependency"):
        attr, val = d.str("attribute"), d.value("value")
        if not attr or val is None:
            raise bad_request("'dependency' needs parts 'attribute' and 'value'", "dependency")
        deps.append((attr, str(val.get("code")) if isinstance(val, dict) else str(val)))
    results = []
    for c in codings:
        system = c.get("system")
        if not system:
            raise bad_request("the code to translate needs its 'system'", "system",
                              message_id="param-system-missing")
        results.append(term.translate(
            system, c["code"], maps=maps, reverse=reverse, target_system=target_system,
            source_scope=tx.text(call, "sourceScope") or tx.text(call, "source"),
            target_scope=tx.text(call, "targetScope") or tx.text(call, "target"), dependencies=deps))
    if len(results) == 1:
        return results[0]
    # A CodeableConcept: one answer with the matches of every coding.
    found = any(r["parameter"][0]["valueBoolean"] for r in results)
    params: list[dict[str, Any]] = [{"name": "result", "valueBoolean": found}]
    if not found:
        params.append({"name": "message", "valueString": "No mapping found for any coding"})
    for r in results:
        params.extend(x for x in r["parameter"] if x["name"] == "match")
    return {"resourceType": "Parameters", "parameter": params}
