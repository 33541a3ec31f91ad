"""CodeSystem/$validate-code and ValueSet/$validate-code — type and instance level, GET and POST."""

from __future__ import annotations

from typing import Any

from dhp.errors import FHIRError, Issue, bad_request
from dhp.interactions.operations import OperationCall, operation
from dhp.terminology import operations as tx
from dhp.terminology.codesystem import CodeSystemIndex
from dhp.terminology.engine import Verdict
from dhp.terminology.valueset import Options

VS_PARAMS = {"url", "valueSet", "valueSetVersion", "code", "system", "systemVersion", "version", "display",
             "coding", "codeableConcept", "date", "abstract", "displayLanguage", "activeOnly", "useSupplement",
             "context", "inferSystem"}
CS_PARAMS = {"url", "codeSystem", "code", "version", "display", "coding", "codeableConcept", "date", "abstract",
             "displayLanguage", "useSupplement"}


def _codings(call: OperationCall, default_system: str | None,
             version_param: str) -> tuple[list[tuple[str | None, str, str | None, str | None]], list[str],
                                          dict[str, Any] | None]:
    """(system, code, version, display) to check, their paths, and the CodeableConcept if one was given."""
    p = call.params
    code = tx.text(call, "code")
    coding = tx.coding(call, "coding")
    cc = tx.codeable(call, "codeableConcept")
    given = [x for x in (code, coding, cc) if x is not None]
    if len(given) != 1:
        raise bad_request("give exactly one of 'code', 'coding' or 'codeableConcept'",
                          "code" if not given else "coding", message_id="param-code-missing")
    if code is not None:
        system = p.str("system") or default_system
        return [(system, code, p.str(version_param), p.str("display"))], ["Coding"], None
    if coding is not None:
        return ([(coding.get("system") or default_system, coding["code"], coding.get("version"),
                  coding.get("display") or p.str("display"))], ["Coding"], None)
    assert cc is not None
    items = []
    paths = []
    for i, c in enumerate(cc.get("coding") or []):
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            items.append((c.get("system") or default_system, c["code"], c.get("version"), c.get("display")))
            paths.append(f"CodeableConcept.coding[{i}]")
    if not items:
        raise bad_request("the CodeableConcept has no coding with a code", "codeableConcept")
    return items, paths, cc


@operation("validate-code", types=("ValueSet",), type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/ValueSet-validate-code")
async def validate_code_vs(call: OperationCall) -> dict[str, Any]:
    tx.check_names(call, VS_PARAMS)
    term = tx.engine(call)
    p = call.params
    url = tx.text(call, "url")
    inline = tx.resource(call, "valueSet", "ValueSet")
    vs: dict[str, Any] | None
    if call.id is not None:
        if url is not None or inline is not None:
            raise bad_request("an instance-level $validate-code takes neither 'url' nor 'valueSet'", "url")
        vs = await tx.instance(call)
    elif inline is not None:
        if url is not None:  # as $expand does: which one to check against would be a guess
            raise bad_request("give either 'url' or 'valueSet', not both", "url")
        vs = inline
    elif url is not None:
        vs = term.value_set(url.partition("|")[0], p.str("valueSetVersion") or url.partition("|")[2] or None)
        if vs is None:
            raise FHIRError(404, f"ValueSet {url} is not known here", "not-found", expression="url",
                            message_id="vs-unknown")
    else:
        raise bad_request("ValueSet/$validate-code needs 'url' or 'valueSet' (or a ValueSet instance)", "url")
    version_param = "systemVersion" if p.has("systemVersion") else "version"
    items, paths, cc = _codings(call, None, version_param)
    langs = tx.langs(call)
    abstract_ok = p.bool("abstract") is not False
    opts = Options(active_only=p.bool("activeOnly") is True)
    verdicts = [term.check(s, c, vs, display=d, version=v, langs=langs, abstract_ok=abstract_ok, opts=opts,
                           path=path)
                for (s, c, v, d), path in zip(items, paths, strict=True)]
    verdict = verdicts[0] if cc is None else tx.combine(verdicts, paths)
    return tx.verdict_parameters(verdict, codeable_concept=cc)


@operation("validate-code", types=("CodeSystem",), type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/CodeSystem-validate-code")
async def validate_code_cs(call: OperationCall) -> dict[str, Any]:
    tx.check_names(call, CS_PARAMS)
    term = tx.engine(call)
    url = tx.text(call, "url")
    inline = tx.resource(call, "codeSystem", "CodeSystem")
    index: CodeSystemIndex | None = None
    system: str | None
    pinned: str | None = None
    if call.id is not None:
        if url is not None or inline is not None:
            raise bad_request("an instance-level $validate-code takes neither 'url' nor 'codeSystem'", "url")
        cs = await tx.instance(call)
        system = cs.get("url")
        if not system or term.code_system(system, cs.get("version")) is None:
            index = CodeSystemIndex(cs)
    elif inline is not None:
        if url is not None:
            raise bad_request("give either 'url' or 'codeSystem', not both", "url")
        system = inline.get("url")
        index = CodeSystemIndex(inline)
    else:
        # url=system|version: the version is not part of the system (the answer's 'system' must be bare)
        bare, _, ver = (url or "").partition("|")
        system, pinned = bare or None, ver or None
    items, paths, cc = _codings(call, system, "version")
    if pinned:
        items = [(s, c, v or pinned, d) for s, c, v, d in items]
    if system is None and any(s is None for s, *_ in items):
        raise bad_request("CodeSystem/$validate-code needs 'url' (or a coding with a system)", "url")
    langs = tx.langs(call)
    abstract_ok = call.params.bool("abstract") is not False
    verdicts: list[Verdict] = []
    for (s, c, v, d), path in zip(items, paths, strict=True):
        if system and s and s != system and term.canonical_system(s) != term.canonical_system(system):
            verdicts.append(Verdict(False, c, s, issues=[Issue(
                "error", "invalid", f"Coding system {s} is not the code system {system} being checked",
                [f"{path}.system"], "system-mismatch")]))
        elif index is not None:
            verdicts.append(term.check_in_index(index, c, d, langs, abstract_ok, path))
        else:
            verdicts.append(term.check(s, c, None, display=d, version=v, langs=langs, abstract_ok=abstract_ok,
                                       path=path))
    verdict = verdicts[0] if cc is None else tx.combine(verdicts, paths)
    return tx.verdict_parameters(verdict, codeable_concept=cc)
