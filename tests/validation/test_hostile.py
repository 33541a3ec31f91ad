"""Hostile resources: wrong JSON types where the validator collects codes or extensions, deep nesting,
nested contained resources, and expressions that must point at the right array index.

Each case crashed the validator (a 500 over HTTP), hung it, or reported the wrong expression.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from tests.validation.conftest import UZ, errors, find


def _no_crash(validator: Any, resource: dict[str, Any]) -> list[Any]:
    issues: list[Any] = validator.validate(resource)
    return issues


def test_coding_system_of_the_wrong_type_is_an_error_not_a_crash(validator: Any, david: dict[str, Any]) -> None:
    # The system reached the terminology cache as a dict key: TypeError (unhashable).
    david["maritalStatus"] = {"coding": [{"system": {"a": 1}, "code": "M"}]}
    issues = _no_crash(validator, david)
    assert find(issues, "json-type", "Patient.maritalStatus.coding[0].system")


def test_coding_that_is_not_an_array(validator: Any, david: dict[str, Any]) -> None:
    david["maritalStatus"] = {"coding": True}
    issues = _no_crash(validator, david)
    assert any(i.message_id == "array-expected" and "Patient.maritalStatus.coding" in i.expression
               for i in errors(issues))


def test_extension_that_is_not_an_array_on_a_bound_concept(validator: Any, uz_examples: dict[str, Any]) -> None:
    # A required binding with no code looks for a data-absent-reason extension: it iterated the number.
    prov = copy.deepcopy(uz_examples["Provenance-example-provenance.json"][1])
    prov["agent"][0]["type"] = {"extension": -1, "text": "author"}
    issues = _no_crash(validator, prov)
    assert find(issues, "array-expected", "Provenance.agent[0].type.extension")


def test_contained_that_is_not_an_array(validator: Any, david: dict[str, Any]) -> None:
    david["contained"] = 5
    issues = _no_crash(validator, david)
    assert find(issues, "array-expected", "Patient.contained")


def test_deeply_nested_extensions_are_refused_without_exhausting_the_stack(validator: Any,
                                                                           david: dict[str, Any]) -> None:
    ext: dict[str, Any] = {"url": "http://example.org/e", "valueString": "a"}
    for _ in range(3000):
        ext = {"url": "http://example.org/e", "extension": [ext]}
    david["extension"] = [ext]
    issues = _no_crash(validator, david)
    assert find(issues, "nesting-too-deep")
    assert all(i.severity != "fatal" for i in issues)  # stopped by the limit, not by a RecursionError


def test_nested_contained_resources_are_walked_once_per_profile(validator: Any) -> None:
    # Each level was walked once per plan (base + meta.profile) for every walk of its parent: 2^depth.
    res: dict[str, Any] = {"resourceType": "Patient", "id": "c"}
    for _ in range(22):
        res = {"resourceType": "Patient", "id": "c", "meta": {"profile": [UZ + "uz-core-patient"]},
               "contained": [res]}
    t = time.monotonic()
    issues = _no_crash(validator, res)
    assert time.monotonic() - t < 5
    assert find(issues, "invariant-dom-2")


def test_unknown_profile_expression_counts_non_string_entries(validator: Any, david: dict[str, Any]) -> None:
    david["meta"]["profile"] = [UZ + "uz-core-patient", None, 5, "http://example.org/unknown-profile"]
    issues = _no_crash(validator, david)
    hits = find(issues, "profile-unknown")
    assert [h.expression for h in hits] == [["Patient.meta.profile[3]"]]


def test_reference_to_an_entry_whose_resource_type_is_an_object(validator: Any) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:0d3e3c5e-0a52-4f7e-9a58-000000000001",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:0d3e3c5e-0a52-4f7e-9a58-000000000002"}}},
        {"fullUrl": "urn:uuid:0d3e3c5e-0a52-4f7e-9a58-000000000002", "resource": {"resourceType": {"a": 1}}}]}
    issues = _no_crash(validator, bundle)
    assert find(issues, "resource-type", "Bundle.entry[1].resource")
