"""Profiles created at run time (the registry overlay, as the REST API does), differential only: snapshot
generation, every slicing discriminator and rule, limits, and the cache dropping plans when the overlay changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from tests.validation.conftest import UZ, errors, find

URL = "http://example.org/fhir/StructureDefinition/test-patient"
V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _e(eid: str, **kw: Any) -> dict[str, Any]:
    path = ".".join(seg.split(":")[0] for seg in eid.split("."))
    out: dict[str, Any] = {"id": eid, "path": path}
    last = eid.rsplit(".", 1)[-1]
    if ":" in last:
        out["sliceName"] = last.split(":", 1)[1]
    out.update(kw)
    return out


def _profile(family_max: int = 5) -> dict[str, Any]:
    return {
        "resourceType": "StructureDefinition", "id": "test-patient", "url": URL, "version": "1.0.0",
        "name": "TestPatient", "status": "draft", "kind": "resource", "abstract": False, "type": "Patient",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient", "derivation": "constraint",
        "differential": {"element": [
            _e("Patient.identifier", slicing={"discriminator": [{"type": "pattern", "path": "type"}],
                                              "rules": "closed", "ordered": True}),
            _e("Patient.identifier:mr", min=0, max="1"),
            _e("Patient.identifier:mr.type", patternCodeableConcept={"coding": [{"system": V2, "code": "MR"}]}),
            _e("Patient.identifier:ppn", min=0, max="1"),
            _e("Patient.identifier:ppn.type", patternCodeableConcept={"coding": [{"system": V2, "code": "PPN"}]}),
            _e("Patient.name.family", maxLength=family_max),
            _e("Patient.telecom", slicing={"discriminator": [{"type": "exists", "path": "period"}],
                                           "rules": "openAtEnd"}),
            _e("Patient.telecom:dated", min=0, max="*"),
            _e("Patient.telecom:dated.period", min=1),
            _e("Patient.deceased[x]", slicing={"discriminator": [{"type": "type", "path": "$this"}],
                                               "rules": "closed"}),
            _e("Patient.deceased[x]:deceasedBoolean", min=0, max="1", type=[{"code": "boolean"}],
               fixedBoolean=False),
            _e("Patient.multipleBirth[x]", type=[{"code": "integer"}], minValueInteger=1, maxValueInteger=5),
            _e("Patient.address", slicing={"discriminator": [{"type": "position", "path": "$this"}],
                                           "rules": "open"}),
            _e("Patient.address:home", min=0, max="1"),
            _e("Patient.address:home.use", fixedCode="home"),
            _e("Patient.contained", slicing={"discriminator": [{"type": "profile", "path": "$this"}],
                                             "rules": "open"}),
            _e("Patient.contained:uzorg", min=1, max="1",
               type=[{"code": "Organization", "profile": [UZ + "uz-core-organization"]}]),
            _e("Patient.managingOrganization", min=1),
        ]},
    }


UZ_ORG = {"resourceType": "Organization", "id": "org",
          "identifier": [{"system": "https://dhp.uz/fhir/core/sid/org/uz/soliq", "value": "123456789"}],
          "name": "Clinic", "active": True}


def _patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "meta": {"profile": [URL]},
            "contained": [copy.deepcopy(UZ_ORG)], "managingOrganization": {"reference": "#org"},
            "identifier": [{"type": {"coding": [{"system": V2, "code": "MR"}]}, "value": "1"},
                           {"type": {"coding": [{"system": V2, "code": "PPN"}]}, "value": "2"}],
            "name": [{"family": "Aziz"}],
            "telecom": [{"system": "phone", "value": "1", "period": {"start": "2020"}},
                        {"system": "phone", "value": "2"}],
            "deceasedBoolean": False, "multipleBirthInteger": 2,
            "address": [{"use": "home", "city": "Tashkent"}, {"use": "work", "city": "Samarkand"}]}


@pytest.fixture
def overlay(registry: Any) -> Iterator[Any]:
    epoch = registry.epoch
    registry.set_overlay([_profile()], epoch + 1)
    yield registry
    registry.set_overlay([], epoch + 2)


def test_valid_against_overlay_profile(overlay: Any, validator: Any) -> None:
    issues = validator.validate(_patient())
    assert not errors(issues), [(i.message_id, i.expression, i.diagnostics) for i in errors(issues)]


@pytest.mark.parametrize("mutate,message_id,expression", [
    # pattern discriminator, closed: an identifier that matches no slice
    (lambda p: p["identifier"].append({"type": {"coding": [{"system": V2, "code": "DL"}]}, "value": "3"}),
     "slice-unmatched", "Patient.identifier[2]"),
    # ordered slicing
    (lambda p: p["identifier"].reverse(), "slice-order", "Patient.identifier[1]"),
    # maxLength
    (lambda p: p["name"][0].update(family="Abdurakhmanov"), "max-length", "Patient.name[0].family"),
    # exists discriminator + openAtEnd: the undated telecom before the dated one
    (lambda p: p["telecom"].reverse(), "slice-order", "Patient.telecom[1]"),
    # type discriminator, closed: deceasedDateTime matches no slice
    (lambda p: (p.pop("deceasedBoolean"), p.update(deceasedDateTime="2020-01-01")), "slice-unmatched",
     "Patient.deceased"),
    # fixed value inside the type slice
    (lambda p: p.update(deceasedBoolean=True), "fixed-value", "Patient.deceased.ofType(boolean)"),
    # minValue / maxValue
    (lambda p: p.update(multipleBirthInteger=0), "min-value", "Patient.multipleBirth.ofType(integer)"),
    (lambda p: p.update(multipleBirthInteger=9), "max-value", "Patient.multipleBirth.ofType(integer)"),
    # position discriminator: the first address must be the home one
    (lambda p: p["address"].reverse(), "fixed-value", "Patient.address[0].use"),
    # profile discriminator: the contained organization no longer conforms to uz-core-organization
    (lambda p: p["contained"][0]["identifier"][0].update(system="http://x y"), "slice-cardinality-min", "Patient.contained"),
    # cardinality from the differential
    (lambda p: p.pop("managingOrganization"), "cardinality-min", "Patient.managingOrganization"),
])
def test_overlay_profile_rules(overlay: Any, validator: Any, mutate: Any, message_id: str,
                               expression: str) -> None:
    p = _patient()
    mutate(p)
    issues = validator.validate(p)
    hits = find(issues, message_id, expression)
    assert hits and hits[0].severity == "error", [(i.message_id, i.expression, i.diagnostics) for i in issues]


def test_plans_are_dropped_when_the_overlay_changes(registry: Any, validator: Any) -> None:
    epoch = registry.epoch
    try:
        registry.set_overlay([_profile(family_max=5)], epoch + 1)
        p = _patient()
        p["name"][0]["family"] = "Abdulla"  # 7 characters
        assert find(validator.validate(p), "max-length")
        registry.set_overlay([_profile(family_max=20)], epoch + 2)  # the profile was updated through the API
        assert not find(validator.validate(p), "max-length")
    finally:
        registry.set_overlay([], epoch + 3)
    # and once the profile is gone, meta.profile names an unknown profile
    assert find(validator.validate(_patient()), "profile-unknown")
