"""CodeSystem/$subsumes — type and instance level, GET and POST."""

from __future__ import annotations

from typing import Any

from dhp.errors import bad_request
from dhp.interactions.operations import OperationCall, operation
from dhp.terminology import operations as tx

PARAMS = {"codeA", "codeB", "system", "version", "codingA", "codingB"}


def _one(call: OperationCall, side: str, system: str | None) -> tuple[str, str | None]:
    code = tx.text(call, "code" + side)
    coding = tx.coding(call, "coding" + side)
    if (code is None) == (coding is None):
        raise bad_request(f"give exactly one of 'code{side}' or 'coding{side}'", "code" + side,
                          message_id="param-code-missing")
    if coding is not None:
        s = coding.get("system")
        if s and system and s != system:
            raise bad_request(f"coding{side} is from {s}, not from {system}", "coding" + side,
                              message_id="system-mismatch")
        return coding["code"], s or system
    assert code is not None
    return code, system


@operation("subsumes", types=("CodeSystem",), type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/CodeSystem-subsumes")
async def subsumes(call: OperationCall) -> dict[str, Any]:
    tx.check_names(call, PARAMS)
    term = tx.engine(call)
    system = tx.text(call, "system")
    version = tx.text(call, "version")
    if call.id is not None:
        cs = await tx.instance(call)
        if system is not None and system != cs.get("url"):
            raise bad_request(f"system {system} is not this code system ({cs.get('url')})", "system")
        system = cs.get("url")
        version = version or cs.get("version")
    code_a, sys_a = _one(call, "A", system)
    code_b, sys_b = _one(call, "B", system)
    system = system or sys_a or sys_b
    if not system:
        raise bad_request("$subsumes needs a 'system' (or codings with one)", "system",
                          message_id="param-system-missing")
    if sys_a and sys_b and sys_a != sys_b:
        raise bad_request(f"codingA ({sys_a}) and codingB ({sys_b}) are from different code systems", "codingB",
                          message_id="system-mismatch")
    outcome = term.subsumes(system, code_a, code_b, version)
    return {"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": outcome}]}
