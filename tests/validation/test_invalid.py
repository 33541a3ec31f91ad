"""A corpus of invalid instances: each breaks one rule and must yield the expected issue at the expected path.

Built by breaking valid UZ Core / Integrations instances (and, for rules the shipped profiles do not use —
maxLength, minValue, every slicing discriminator and rule — small profiles created in the registry overlay,
exactly as profiles created through the REST API are).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dhp import fhirjson
from tests.validation.conftest import DAR, INT, UZ, errors, find

XHTML = "http://www.w3.org/1999/xhtml"


def check(validator: Any, res: dict[str, Any], message_id: str, expression: str,
          severity: str = "error", profiles: list[str] | None = None) -> Any:
    issues = validator.validate(res, profiles)
    hits = find(issues, message_id, expression)
    assert hits, [(i.severity, i.message_id, i.expression, i.diagnostics) for i in issues]
    assert hits[0].severity == severity, hits[0]
    return hits[0]


# ------------------------------------------------------------------ structure (base R5)

@pytest.mark.parametrize("mutate,message_id,expression", [
    (lambda p: p.update(foo=1), "unknown-element", "Patient.foo"),
    (lambda p: p.update(active="yes"), "json-type", "Patient.active"),
    (lambda p: p.update(id="bad id!"), "primitive-format", "Patient.id"),
    (lambda p: p.update(implicitRules="http://a b"), "primitive-format", "Patient.implicitRules"),
    (lambda p: p.update(birthDate="2020-02-30"), "primitive-format", "Patient.birthDate"),
    (lambda p: p.update(birthDate="20-01-01"), "primitive-format", "Patient.birthDate"),
    (lambda p: p.update(deceasedDateTime="2020-01-01T10:00:00"), "primitive-format",
     "Patient.deceased.ofType(dateTime)"),
    (lambda p: p["meta"].update(lastUpdated="2020-01-01"), "primitive-format", "Patient.meta.lastUpdated"),
    (lambda p: p.update(multipleBirthInteger=3000000000), "primitive-format", "Patient.multipleBirth.ofType(integer)"),
    (lambda p: p.update(multipleBirthInteger=1.5), "json-type", "Patient.multipleBirth.ofType(integer)"),
    (lambda p: p.update(multipleBirthInteger=fhirjson.loads(b"-0")), "primitive-format",
     "Patient.multipleBirth.ofType(integer)"),
    (lambda p: p.update(photo=[{"contentType": "image/png", "data": "***"}]), "primitive-format",
     "Patient.photo[0].data"),
    (lambda p: p.update(gender=" male"), "primitive-format", "Patient.gender"),
    (lambda p: p.update(name={"family": "X"}), "array-expected", "Patient.name"),
    (lambda p: p.update(gender=["male"]), "array-unexpected", "Patient.gender"),
    (lambda p: p.update(contained=[{"id": "x", "name": "n"}]), "resource-type", "Patient.contained[0]"),
    (lambda p: p.update(contained=[{"resourceType": "Nonsense", "id": "x"}]), "resource-type",
     "Patient.contained[0]"),
    (lambda p: p.update(maritalStatus={}), "empty-value", "Patient.maritalStatus"),
    (lambda p: p.update(telecom=[]), "empty-value", "Patient.telecom"),
    (lambda p: p["name"][0].update(family=""), "primitive-format", "Patient.name[0].family"),
    (lambda p: p.update(_birthDate={"value": "2020"}), "unknown-element", "Patient.birthDate"),
    (lambda p: p.update(_active={"extension": [{"url": "http://x.org/e"}]}), "invariant-ext-1",
     "Patient.active.extension[0]"),
    (lambda p: p.update(deceasedBoolean=True, deceasedDateTime="2020"), "choice-multiple", "Patient.deceasedDateTime"),
    (lambda p: p.update(text={"status": "generated", "div": f'<div xmlns="{XHTML}"><script>x()</script></div>'}),
     "xhtml-unsafe", "Patient.text.div"),
    (lambda p: p.update(text={"status": "generated", "div": f'<div xmlns="{XHTML}"><p onclick="x()">a</p></div>'}),
     "xhtml-unsafe", "Patient.text.div"),
    (lambda p: p.update(text={"status": "generated",
                              "div": f'<div xmlns="{XHTML}"><img src="http://evil.example/t.png"/></div>'}),
     "xhtml-unsafe", "Patient.text.div"),
    (lambda p: p.update(text={"status": "generated", "div": "<div><p>unclosed</div>"}),
     "xhtml-invalid", "Patient.text.div"),
])
def test_structure_rules(validator: Any, david: dict[str, Any], mutate: Any, message_id: str,
                         expression: str) -> None:
    mutate(david)
    check(validator, david, message_id, expression)


def test_valid_primitive_extension_form_is_accepted(validator: Any, david: dict[str, Any]) -> None:
    david.pop("birthDate", None)
    david["_birthDate"] = {"extension": [{"url": DAR, "valueCode": "unknown"}]}
    assert not errors(validator.validate(david))


def test_bundle_entry_needs_resource_type(base_validator: Any) -> None:
    b = {"resourceType": "Bundle", "type": "collection", "entry": [{"fullUrl": "urn:uuid:1", "resource": {"id": "x"}}]}
    check(base_validator, b, "resource-type", "Bundle.entry[0].resource")


# ------------------------------------------------------------------ profiles (UZ Core)

def test_cardinality_min_names_dar_remedy(validator: Any, david: dict[str, Any]) -> None:
    del david["identifier"]
    hit = check(validator, david, "cardinality-min", "Patient.identifier")
    assert "data-absent-reason" in hit.diagnostics and "uz-core-patient" in hit.diagnostics


def test_dar_satisfies_required_element(validator: Any, david: dict[str, Any]) -> None:
    david["identifier"] = [{"extension": [{"url": DAR, "valueCode": "unknown"}]}]
    assert not errors(validator.validate(david))


def test_slice_cardinality_max(validator: Any, david: dict[str, Any]) -> None:
    dl = next(i for i in david["identifier"] if i["system"] == "https://gov.uz/iiv/identifier/driverslicense")
    david["identifier"].append(copy.deepcopy(dl))
    check(validator, david, "slice-cardinality-max", "Patient.identifier")


def test_pattern_inside_slice(validator: Any, david: dict[str, Any]) -> None:
    dl = next(i for i in david["identifier"] if i["system"] == "https://gov.uz/iiv/identifier/driverslicense")
    idx = david["identifier"].index(dl)
    dl["type"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PPN"}]}
    check(validator, david, "pattern-value", f"Patient.identifier[{idx}].type")


def test_reference_target_type(validator: Any, david: dict[str, Any]) -> None:
    david["managingOrganization"] = {"reference": "Patient/other"}
    check(validator, david, "reference-type", "Patient.managingOrganization.reference")


def test_type_not_allowed_by_profile(validator: Any, uz_examples: dict[str, Any]) -> None:
    obs = copy.deepcopy(uz_examples["Observation-example-david-education.json"][1])
    obs.pop("valueCodeableConcept", None)
    obs["valueString"] = "secondary"
    check(validator, obs, "unknown-element", "Observation.valueString")


def test_required_binding(validator: Any, david: dict[str, Any]) -> None:
    david["gender"] = "robot"
    check(validator, david, "binding-required", "Patient.gender")


def test_extensible_binding_is_a_warning(validator: Any, uz_examples: dict[str, Any]) -> None:
    org = copy.deepcopy(uz_examples["Organization-example-organization.json"][1])
    hit = find(validator.validate(org), "binding-extensible")
    assert hit and hit[0].severity == "warning"


def test_code_from_unloaded_system_is_not_checked_information(validator: Any, uz_examples: dict[str, Any]) -> None:
    obs = copy.deepcopy(uz_examples["Observation-example-uzcoreobservation-blood-pressure.json"][1])
    issues = validator.validate(obs)
    info = find(issues, "binding-not-checked")
    assert info and all(i.severity == "information" for i in info)
    assert any("loinc" in i.diagnostics.lower() for i in info)
    assert not errors(issues)


def test_profile_invariant(validator: Any, david: dict[str, Any]) -> None:
    david["gender"] = "other"
    david.pop("_gender", None)
    hit = check(validator, david, "invariant-uzcore-gender-other-2", "Patient")
    assert "uzcore-gender-other-2" in hit.diagnostics


def test_base_invariant_pat1(validator: Any, david: dict[str, Any]) -> None:
    david["contact"] = [{"gender": "male"}]
    check(validator, david, "invariant-pat-1", "Patient.contact[0]")


def test_extension_context(validator: Any, david: dict[str, Any]) -> None:
    david["name"][0]["extension"] = [{"url": UZ + "gender-other", "valueCoding": {
        "system": "https://terminology.dhp.uz/fhir/core/CodeSystem/gender-other-cs", "code": "1"}}]
    check(validator, david, "extension-context", "Patient.name[0].extension[0]")


def test_unknown_extension_is_a_warning(validator: Any, david: dict[str, Any]) -> None:
    david.setdefault("extension", []).append({"url": "http://example.org/unknown", "valueString": "x"})
    hit = check(validator, david, "extension-unknown", f"Patient.extension[{len(david['extension']) - 1}]",
                severity="warning")
    assert hit


def test_unknown_modifier_extension_is_an_error(validator: Any, david: dict[str, Any]) -> None:
    david["modifierExtension"] = [{"url": "http://example.org/unknown", "valueString": "x"}]
    check(validator, david, "extension-unknown", "Patient.modifierExtension[0]")


def test_unknown_meta_profile_is_an_error(validator: Any, david: dict[str, Any]) -> None:
    david["meta"]["profile"].append("http://example.org/StructureDefinition/nope")
    check(validator, david, "profile-unknown", "Patient.meta.profile[1]")


def test_require_meta_profile(registry: Any, terminology: Any, david: dict[str, Any]) -> None:
    from dhp.validation import Validator

    strict = Validator(registry, terminology, require_meta_profile=True)
    del david["meta"]["profile"]
    check(strict, david, "meta-profile-missing", "Patient.meta")


def test_default_profile_applies_without_meta_profile(validator: Any, david: dict[str, Any]) -> None:
    del david["meta"]["profile"]
    del david["identifier"]
    check(validator, david, "cardinality-min", "Patient.identifier")


def test_source_positions(validator: Any) -> None:
    from dhp import fhirjson

    src = b'{\n  "resourceType": "Patient",\n  "id": "x",\n  "active": "yes"\n}\n'
    issues = validator.validate(fhirjson.loads(src), source=src)
    hit = find(issues, "json-type", "Patient.active")[0]
    exts = {e["url"].rsplit("-", 1)[1]: e["valueInteger"] for e in hit.extensions}
    assert exts == {"line": 4, "col": 3}
    assert "line 4" in (hit.details_text or "")


# ------------------------------------------------------------------ Integrations profiles

def _birth_patient(david: dict[str, Any]) -> dict[str, Any]:
    p = copy.deepcopy(david)
    p["meta"] = {"profile": [INT + "patient-birth"]}
    p["extension"] = [e for e in p.get("extension", []) if "placeOfBirth" not in e.get("url", "")]
    return p


def test_patient_birth_requires_place_of_birth_type(validator: Any, david: dict[str, Any]) -> None:
    check(validator, _birth_patient(david), "slice-cardinality-min", "Patient.extension")


def test_patient_birth_inherits_uz_core_patient(validator: Any, david: dict[str, Any]) -> None:
    p = _birth_patient(david)
    del p["identifier"]
    check(validator, p, "cardinality-min", "Patient.identifier")


def test_observation_birth_value_needs_ucum(validator: Any) -> None:
    obs = {"resourceType": "Observation", "meta": {"profile": [INT + "observation-birth"]}, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8339-4"}]},
           "subject": {"reference": "Patient/p"},
           "valueQuantity": {"value": 3200, "unit": "g", "system": "http://example.org/units", "code": "g"}}
    check(validator, obs, "pattern-value", "Observation.value.ofType(Quantity).system")


def test_related_person_birth_needs_education(validator: Any) -> None:
    rp = {"resourceType": "RelatedPerson", "meta": {"profile": [INT + "related-person-birth"]},
          "patient": {"reference": "Patient/p"}}
    check(validator, rp, "slice-cardinality-min", "RelatedPerson.extension")


def _birth_document(patient_profile: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "document", "timestamp": "2024-01-01T10:00:00+05:00",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:9b2e6c3a-1111-4111-8111-111111111111"},
            "entry": [
                {"fullUrl": "urn:uuid:0a000000-0000-4000-8000-000000000001",
                 "resource": {"resourceType": "Composition", "status": "final",
                              "meta": {"profile": [INT + "composition-birth"]},
                              "type": {"coding": [{"system": "http://loinc.org", "code": "71230-7"}]},
                              "subject": [{"reference": "urn:uuid:0a000000-0000-4000-8000-000000000002"}],
                              "date": "2024-01-01T10:00:00+05:00", "title": "Birth",
                              "author": [{"reference": "urn:uuid:0a000000-0000-4000-8000-000000000003"}]}},
                {"fullUrl": "urn:uuid:0a000000-0000-4000-8000-000000000002",
                 "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "not a patient"}}},
                {"fullUrl": "urn:uuid:0a000000-0000-4000-8000-000000000003",
                 "resource": {"resourceType": "PractitionerRole", "active": True}},
            ]}


def test_document_reference_resolved_by_full_url(validator: Any) -> None:
    doc = _birth_document(INT + "patient-birth")
    check(validator, doc, "reference-type", "Bundle.entry[0].resource.ofType(Composition).subject[0].reference")


def test_document_bundle_invariants(base_validator: Any) -> None:
    doc = _birth_document(INT + "patient-birth")
    doc["entry"] = doc["entry"][1:]  # Composition no longer first
    check(base_validator, doc, "invariant-bdl-11", "Bundle")
    del doc["timestamp"]
    check(base_validator, doc, "invariant-bdl-10", "Bundle")


def test_transaction_duplicate_full_url(base_validator: Any) -> None:
    e = {"fullUrl": "urn:uuid:0a000000-0000-4000-8000-000000000009",
         "resource": {"resourceType": "Basic", "code": {"text": "x"}}, "request": {"method": "POST", "url": "Basic"}}
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [e, copy.deepcopy(e)]}
    check(base_validator, tx, "invariant-bdl-7", "Bundle")
    tx["entry"][1]["request"] = {"url": "Basic"}
    check(base_validator, tx, "invariant-bdl-3c", "Bundle")


def test_large_transaction_validates_all_entries(base_validator: Any) -> None:
    """10,000 entries, references between them by urn:uuid: every entry checked, references resolved
    (the timing is in benchmarks/validation_bench.py)."""
    entries = []
    for i in range(10_000):
        pid = f"urn:uuid:00000000-0000-4000-8000-{i:012d}"
        res: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": f"P{i}"}]}
        if i:
            res["link"] = [{"other": {"reference": f"urn:uuid:00000000-0000-4000-8000-{i - 1:012d}"},
                            "type": "seealso"}]
        entries.append({"fullUrl": pid, "resource": res, "request": {"method": "POST", "url": "Patient"}})
    entries[5000]["resource"]["gender"] = "robot"
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    issues = base_validator.validate(tx)
    errs = errors(issues)
    assert [i.expression for i in errs] == [["Bundle.entry[5000].resource.ofType(Patient).gender"]]


def test_relative_reference_resolved_against_full_url(validator: Any) -> None:
    doc = _birth_document(INT + "patient-birth")
    for n, e in enumerate(doc["entry"], start=1):
        e["fullUrl"] = f"https://dhp.example/fhir/{e['resource']['resourceType']}/{n}"
        e["resource"]["id"] = str(n)
    doc["entry"][0]["resource"]["subject"] = [{"reference": "Observation/2"}]
    doc["entry"][0]["resource"]["author"] = [{"reference": "PractitionerRole/3"}]
    check(validator, doc, "reference-type", "Bundle.entry[0].resource.ofType(Composition).subject[0].reference")
    doc["entry"][0]["resource"]["subject"] = [{"reference": "Patient/404"}]
    check(validator, doc, "reference-unresolved", "Bundle.entry[0].resource.ofType(Composition).subject[0].reference",
          severity="warning")


def test_ordinary_extension_in_modifier_extension(validator: Any, david: dict[str, Any]) -> None:
    david["modifierExtension"] = [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                                   "valueAddress": {"city": "Tashkent"}}]
    check(validator, david, "extension-modifier", "Patient.modifierExtension[0]")


@pytest.mark.parametrize(("start", "end", "broken"), [
    ("2024-03-05T10:00:00+05:00", "2024-03-05T09:00:00+05:00", True),
    ("2024-03-05T10:00:00+05:00", "2024-03-05T05:30:00Z", False),  # half an hour later, in UTC
    ("2024-03", "2024-03-01", False),  # a month and its first day overlap
    ("2025-06", "2024-12-31", True),
    ("2024-03-05", "2024-03-04T20:00:00Z", False),  # a date without a zone may be in any zone
    # the ends of the calendar: ranges past them are compared like any (datetime overflows there)
    ("0001-01-01", "2020-01-01", False),
    ("2020-01-01", "9999-12-31", False),
    ("9999-12-31T23:00:00-05:00", "9999-12-31T23:30:00-05:00", False),
    ("9999-12-31T23:30:00-05:00", "9999-12-31T23:00:00-05:00", True),
])
def test_period_start_not_after_end(base_validator: Any, start: str, end: str, broken: bool) -> None:
    enc = {"resourceType": "Encounter", "status": "planned", "actualPeriod": {"start": start, "end": end}}
    hits = find(base_validator.validate(enc), "invariant-per-1")
    assert bool(hits) == broken, hits
