"""``$validate`` (type and instance level): validate a resource against the base specification and its
profiles without storing it. Always answers 200 with an OperationOutcome; the issues tell the verdict."""

from __future__ import annotations

from typing import Any

from dhp import fhirjson
from dhp.errors import FHIRError, Issue, bad_request, not_found, outcome
from dhp.interactions.operations import OperationCall, operation

MODES = ("create", "update", "delete", "profile")


def _validator(call: OperationCall) -> Any:
    v = call.server.validator
    if v is None:
        from dhp.validation import Validator

        v = Validator(call.server.registry, call.server.terminology,
                      require_meta_profile=call.server.settings.require_meta_profile)
        call.server.validator = v
    return v


@operation("validate", types=None, type_level=True, instance=True,
           definition="http://hl7.org/fhir/OperationDefinition/Resource-validate")
async def validate(call: OperationCall) -> dict[str, Any]:
    mode = call.params.str("mode")
    if mode is not None and mode not in MODES:
        raise bad_request(f"mode must be one of {', '.join(MODES)}, not '{mode}'", "mode",
                          message_id="validate-mode")
    profiles = [str(p) for p in call.params.values("profile") if isinstance(p, str)]
    resource = call.params.value("resource") if call.params.has("resource") else call.body
    if resource is not None and not isinstance(resource, dict):
        raise bad_request("parameter 'resource' must be a resource", "resource")
    if resource is None and call.id is not None:
        stored = await call.server.store.read(call.resource_type, call.id)
        if stored is None or stored.deleted:
            raise not_found(f"{call.resource_type}/{call.id} not found")
        resource = fhirjson.loads(stored.content)
    if mode == "delete":
        if call.id is None:
            raise bad_request("mode 'delete' needs an instance-level call ([type]/[id]/$validate)", "mode",
                              message_id="validate-mode")
        # Nothing in DHP forbids deleting a resource on content grounds; the platform retires records by status.
        return outcome([Issue("information", "informational",
                              "no content rules block deleting this resource (DHP prefers retiring records by "
                              "a status change)", message_id="validate-delete")])
    if resource is None:
        raise bad_request("no resource to validate: send it as the body or in the 'resource' parameter",
                          "resource", message_id="validate-no-resource")
    rtype = resource.get("resourceType")
    if call.resource_type and rtype != call.resource_type:
        raise FHIRError(400, f"resource type {rtype!r} does not match the endpoint {call.resource_type}",
                        "invalid", expression="resourceType", message_id="validate-type-mismatch")
    if call.id is not None and mode == "update" and resource.get("id") not in (None, call.id):
        raise FHIRError(400, f"resource id {resource.get('id')!r} does not match {call.id}", "invalid",
                        expression=f"{rtype}.id", message_id="validate-id-mismatch")
    v = _validator(call)
    if mode == "profile" and not profiles:
        raise bad_request("mode 'profile' needs a 'profile' parameter", "profile", message_id="validate-mode")
    source = call.source if resource is call.body else None
    issues = v.validate(resource, profiles or None, mode=mode, source=source)
    return outcome(issues)
