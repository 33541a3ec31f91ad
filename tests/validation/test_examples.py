"""The IG examples validate against what they declare: every UZ Core example, and the R5 spec examples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dhp import fhirjson
from tests.validation.conftest import BASE, errors

# Real defects in hl7.fhir.r5.examples@5.0.0 found by the validator (explained in docs/validation.md): file →
# the message ids its remaining errors may have. Anything else failing is a validator bug.
R5_DEFECTS: dict[str, set[str]] = {
    "Basic-referral.json": {"extension-unknown"},
    "BiologicallyDerivedProduct-allogeneicHCT.json": {"reference-type"},
    "BiologicallyDerivedProduct-autologousHCT.json": {"reference-type"},
    "Bundle-dataelements.json": {"extension-context"},
    "Bundle-types.json": {"extension-context"},
    "Bundle-valuesets.json": {"invariant-scs-1"},
    "DocumentReference-1.2.840.11361907579238403408700.3.1.04.19970327150033.json": {"xhtml-unsafe"},
    "DocumentReference-xray.json": {"reference-type"},
    "Encounter-example.json": {"reference-type"},
    "Patient-patient-example-sex-and-gender.json": {"unknown-element", "cardinality-min"},
    "Transport-simpledelivery.json": {"reference-type"},
    **{f"StructureDefinition-{n}.json": {"invariant-sdf-27"} for n in (
        "Definition", "Event", "FiveWs", "Participant", "ParticipantContactable", "ParticipantLiving", "Product",
        "Publishable", "Request", "Shareable")},
}
# Families of generated examples with the same defect.
R5_DEFECT_PREFIXES: dict[str, set[str]] = {
    "Questionnaire-qgen-": {"invariant-que-2", "binding-required"},
    "PlanDefinition-": {"extension-context"},  # cqf-strengthOfRecommendation on documentation.document
}
R5_PRIMITIVE_SDS = {"base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant",
                    "integer", "integer64", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri",
                    "url", "uuid"}


def _allowed(name: str) -> set[str]:
    allowed = set(R5_DEFECTS.get(name, set()))
    for prefix, ids in R5_DEFECT_PREFIXES.items():
        if name.startswith(prefix):
            allowed |= ids
    if name.removeprefix("StructureDefinition-").removesuffix(".json") in R5_PRIMITIVE_SDS:
        allowed.add("extension-context")  # the regex extension on ElementDefinition.type
    return allowed


def test_all_35_uz_core_examples_are_there(uz_examples: dict[str, Any]) -> None:
    assert len(uz_examples) == 35


def test_uz_core_examples_validate_against_declared_profiles(base_validator: Any,
                                                            uz_examples: dict[str, Any]) -> None:
    failures = {}
    checked_profiles = set()
    for name, (raw, res) in uz_examples.items():
        declared = (res.get("meta") or {}).get("profile")
        checked_profiles.update(declared or [])
        issues = base_validator.validate(res, source=raw)
        if errors(issues):
            failures[name] = [(i.message_id, i.expression, i.diagnostics) for i in errors(issues)]
    assert not failures, failures
    assert len(checked_profiles) >= 14  # the examples really were checked against UZ Core profiles


def test_example_without_profile_fails_the_default_patient_profile(validator: Any,
                                                                    uz_examples: dict[str, Any]) -> None:
    """Patient/example-patient declares no profile; under the DHP default (uz-core-patient) it lacks the
    required identifier — documented in docs/validation.md."""
    raw, res = uz_examples["Patient-example-patient.json"]
    issues = validator.validate(res, source=raw)
    assert [i.message_id for i in errors(issues)] == ["cardinality-min"]
    assert errors(issues)[0].expression == ["Patient.identifier"]


def _r5_folder() -> Path:
    from dhp.conformance import PackageManager, PackageRef
    from dhp.settings import Settings

    s = Settings.from_env()
    pm = PackageManager(s.package_cache, [], s.registry_list)
    ref = pm.ensure(PackageRef("hl7.fhir.r5.examples", "5.0.0"))
    return pm.path_of(ref)


@pytest.mark.slow
def test_r5_examples_validate_against_base_spec(base_validator: Any) -> None:
    folder = _r5_folder()
    # Every 4th file by default (about 40 s); DHP_R5_EXAMPLE_STEP=1 runs all 2,822.
    step = int(os.environ.get("DHP_R5_EXAMPLE_STEP", "4"))
    files = sorted(p for p in folder.glob("*.json") if p.name not in ("package.json",) and not p.name.startswith("."))
    assert len(files) > 2500
    failures: dict[str, list[Any]] = {}
    checked = 0
    for f in files[::step]:
        res = fhirjson.loads(f.read_bytes())
        if not isinstance(res, dict) or "resourceType" not in res:
            continue
        checked += 1
        issues = base_validator.validate(res, [BASE + res["resourceType"]])
        ids = {i.message_id for i in errors(issues)}
        if ids and not ids <= _allowed(f.name):
            failures[f.name] = [(i.message_id, i.expression, i.diagnostics[:200]) for i in errors(issues)][:5]
    assert checked > 2500 // step
    assert not failures, failures
