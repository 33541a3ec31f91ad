"""CodeSystem/$lookup — type and instance level, GET and POST."""

from __future__ import annotations

from typing import Any

from dhp.errors import bad_request
from dhp.interactions.operations import OperationCall, operation
from dhp.terminology import operations as tx

PARAMS = {"code", "system", "version", "coding", "date", "displayLanguage", "property", "useSupplement"}


@operation("lookup", types=("CodeSystem",), type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/CodeSystem-lookup")
async def lookup(call: OperationCall) -> dict[str, Any]:
    tx.check_names(call, PARAMS)
    term = tx.engine(call)
    code = tx.text(call, "code")
    coding = tx.coding(call, "coding")
    system = tx.text(call, "system")
    version = tx.text(call, "version")
    if (code is None) == (coding is None):
        raise bad_request("give exactly one of 'code' (with 'system') or 'coding'", "code",
                          message_id="param-code-missing")
    if coding is not None:
        code = coding["code"]
        system = coding.get("system") or system
        version = coding.get("version") or version
    if call.id is not None:
        cs = await tx.instance(call)
        if system is not None and system != cs.get("url"):
            raise bad_request(f"system {system} is not this code system ({cs.get('url')})", "system")
        system = cs.get("url")
        version = version or cs.get("version")
    if not system:
        raise bad_request("$lookup needs a 'system' with the code", "system", message_id="param-system-missing")
    assert code is not None
    props = tuple(str(v) for v in call.params.values("property"))
    return term.lookup(system, code, version, langs=tx.langs(call), properties=props)
