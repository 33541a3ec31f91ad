"""What the terminology operations (``$lookup``, ``$validate-code``, ``$subsumes``, ``$expand``,
``$translate``) share: parameter reading and checking, instance loading, Parameters output.

The operation modules themselves live in ``dhp.interactions.operations``; they stay thin.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from dhp import fhirjson
from dhp.errors import FHIRError, bad_request
from dhp.terminology.engine import Terminology, Verdict
from dhp.terminology.shape import check_datatype, check_resource
from dhp.terminology.text import language_list

if TYPE_CHECKING:
    from dhp.interactions.operations import OperationCall, Params

# FHIR date/dateTime, with month, day and time fields range-checked (``2020-13`` is not a date).
_DATE = re.compile(r"[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])"
                   r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?")
# FHIR ``integer``: a signed 32-bit number in ASCII digits ([0-9]: ``\d`` takes any script's digits).
_INTEGER = re.compile(r"[+-]?[0-9]{1,10}")
_INT_MAX = 2**31 - 1

# Parameters other tools send that change nothing here; accepted so those clients keep working.
IGNORED = frozenset({"cache-id", "tx-resource", "profile", "diagnostics", "lenient-display-validation",
                     "valueset-membership-only", "default-to-latest-version", "incomplete-ok", "mode",
                     "excludePostCoordinated", "context", "contextDirection", "useSupplement",
                     "limitedExpansion", "inferSystem", "date"})


def engine(call: OperationCall) -> Terminology:
    term = call.server.terminology
    if term is None:
        raise FHIRError(503, "The terminology service is not running", "transient", message_id="tx-unavailable")
    return term


def check_names(call: OperationCall, allowed: set[str]) -> None:
    """400 for a parameter this operation does not define (typos should not pass silently)."""
    unknown = sorted(n for n in call.params.names() if n not in allowed and n not in IGNORED)
    if unknown:
        raise bad_request(f"${call.name} does not take parameter(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(sorted(allowed))}", unknown[0], message_id="param-unknown")
    date = call.params.value("date")
    if date is not None and (not isinstance(date, str) or not _DATE.fullmatch(date)):
        raise bad_request(f"parameter 'date' must be a FHIR date or dateTime, not {date!r}", "date")
    for ref in call.params.values("useSupplement"):
        sup = call.server.registry.resolve(str(ref), "CodeSystem")
        if sup is None or sup.get("content") != "supplement":
            # Every known supplement is always applied; naming an unknown one is an error, not a no-op.
            raise FHIRError(404, f"Supplement {ref} is not known here", "not-found", expression="useSupplement",
                            message_id="cs-unknown")
    for name in call.params.names():
        if name not in ("designation", "property", "useSupplement", "dependency", "exclude-system",
                        "system-version", "check-system-version", "force-system-version", "tx-resource") \
                and len(call.params.all(name)) > 1:
            raise bad_request(f"parameter '{name}' may appear only once", name, message_id="param-repeated")


def langs(call: OperationCall) -> tuple[str, ...]:
    return language_list(call.params.str("displayLanguage"), call.ctx.accept_language)


def text(call: OperationCall, name: str) -> str | None:
    v = call.params.str(name)
    if v is not None and not v.strip():
        raise bad_request(f"parameter '{name}' is empty", name)
    return v


def coding(call: OperationCall, name: str) -> dict[str, Any] | None:
    """A Coding parameter: ``valueCoding`` in a Parameters body, or ``system|code`` in a query string."""
    v = call.params.value(name)
    if v is None:
        return None
    if isinstance(v, dict):
        if not isinstance(v.get("code"), str) or not v["code"]:
            raise bad_request(f"parameter '{name}' needs a code", name)
        check_datatype("Coding", v, name)
        return v
    if isinstance(v, str) and v:
        system, bar, code = v.rpartition("|")
        if not code:
            raise bad_request(f"parameter '{name}' must be system|code, not {v!r}", name)
        return {"system": system, "code": code} if bar else {"code": code}
    raise bad_request(f"parameter '{name}' must be a Coding", name)


def codeable(call: OperationCall, name: str) -> dict[str, Any] | None:
    v = call.params.value(name)
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("coding", []), list):
        raise bad_request(f"parameter '{name}' must be a CodeableConcept (send it in a POST Parameters body)",
                          name)
    check_datatype("CodeableConcept", v, name)
    return v


def resource(call: OperationCall, name: str, rtype: str) -> dict[str, Any] | None:
    v = call.params.value(name)
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("resourceType") != rtype:
        raise bad_request(f"parameter '{name}' must be a {rtype} resource (in a POST Parameters body)", name)
    check_resource(v, name)
    return v


def integer(call: OperationCall, name: str) -> int | None:
    """A FHIR ``integer`` parameter. Stricter than ``int()``: that takes "٣", " 3" and "2_0", and its
    unbounded result (count=10**30) broke JSON output with a 500."""
    v = call.params.value(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | str) or (isinstance(v, str) and not _INTEGER.fullmatch(v)):
        raise bad_request(f"parameter '{name}' must be an integer, not {v!r}", name)
    n = int(v)
    if not -_INT_MAX - 1 <= n <= _INT_MAX:
        raise bad_request(f"parameter '{name}' is out of range (a FHIR integer is 32-bit)", name)
    return n


def non_negative(call: OperationCall, name: str) -> int | None:
    v = integer(call, name)
    if v is not None and v < 0:
        raise bad_request(f"parameter '{name}' must not be negative", name)
    return v


def parts(call: OperationCall, name: str) -> list[Params]:
    """A repeating parameter made of parts (``dependency``), each part a named object."""
    from dhp.interactions.operations import Params

    out: list[Params] = []
    for p in call.params.all(name):
        part = p.get("part")
        if not isinstance(part, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str)
                                                 for x in part):
            raise bad_request(f"parameter '{name}' must have parts, each with a name", name)
        out.append(Params(part))
    return out


async def instance(call: OperationCall) -> dict[str, Any]:
    """The resource an instance-level call names (``ValueSet/mahalla-vs/$expand``), preferring the registry's
    copy of the same canonical so cached indexes and expansions are used."""
    rtype, rid = call.resource_type or "", call.id or ""
    stored = await call.server.store.read(rtype, rid)
    res: dict[str, Any] | None = None
    if stored is not None and not stored.deleted:
        res = fhirjson.loads(stored.content)
    reg = call.server.registry
    if res is not None:
        url = res.get("url")
        if isinstance(url, str):
            canon = reg.resolve(url + ("|" + res["version"] if res.get("version") else ""), rtype)
            if canon is not None and canon.get("id") == res.get("id"):
                return canon
        return res
    for meta in reg.iter_meta(rtype):
        if meta.get("id") == rid and meta.get("url"):
            found = reg.resolve(meta["url"] + ("|" + meta["version"] if meta.get("version") else ""), rtype)
            if found is not None:
                return found
    raise FHIRError(404, f"{rtype}/{rid} is not known here", "not-found", message_id="not-found")


def verdict_parameters(v: Verdict, *, codeable_concept: dict[str, Any] | None = None) -> dict[str, Any]:
    """``$validate-code`` output. ``result`` is false whenever the code could not be confirmed."""
    out: list[dict[str, Any]] = [{"name": "result", "valueBoolean": v.result is True}]
    msg = v.message()
    if v.result is None and not msg:
        msg = "The code could not be checked here"
    if msg:
        out.append({"name": "message", "valueString": msg})
    if v.display is not None:
        out.append({"name": "display", "valueString": v.display})
    if v.code:
        out.append({"name": "code", "valueCode": v.code})
    if v.system:
        out.append({"name": "system", "valueUri": v.system})
    if v.version:
        out.append({"name": "version", "valueString": v.version})
    if v.inactive:
        out.append({"name": "inactive", "valueBoolean": True})
    if codeable_concept is not None:
        out.append({"name": "codeableConcept", "valueCodeableConcept": codeable_concept})
    if v.issues:
        out.append({"name": "issues", "resource": {"resourceType": "OperationOutcome",
                                                   "issue": [i.to_fhir() for i in v.issues]}})
    return {"resourceType": "Parameters", "parameter": out}


def combine(verdicts: list[Verdict], paths: list[str]) -> Verdict:
    """One verdict for a CodeableConcept: valid if any coding is; every coding's issues are kept."""
    best = next((v for v in verdicts if v.result is True), None)
    if best is None:
        best = next((v for v in verdicts if v.result is None), verdicts[0])
    issues = []
    for v, p in zip(verdicts, paths, strict=True):
        for i in v.issues:
            i.expression = [e.replace("Coding", p, 1) for e in i.expression] or [p]
            if best.result is True and i.severity == "error":
                i.severity = "warning"  # another coding carries the concept; this one is a note
            issues.append(i)
    return Verdict(best.result, best.code, best.system, best.version, best.display, issues, best.inactive,
                   best.system_known)
