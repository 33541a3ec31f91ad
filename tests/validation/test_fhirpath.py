"""The FHIRPath functions fhirpathpy lacks (added through its userInvocationTable) and the compiled fast path."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from dhp.validation import fastpath, fhirpath
from dhp.validation.validator import _Run

PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "male", "_birthDate": {"extension": [
    {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]},
    "contained": [{"resourceType": "Organization", "id": "org", "name": "Clinic"}],
    "managingOrganization": {"reference": "#org"}}


@pytest.fixture
def env(validator: Any) -> fhirpath.Env:
    run = _Run()
    run.containers.append(PATIENT)
    run.contained_flags.append(False)
    return validator._make_env(run)


def both(expr: str, focus: Any, env: fhirpath.Env, type_path: str | None = None) -> list[Any]:
    """Evaluate with fhirpathpy (user functions) and the fast path; they must agree."""
    slow = fhirpath.evaluate(expr, focus, type_path, env, {"resource": focus, "rootResource": focus})
    fast = fastpath.evaluate(expr, focus, {"resource": focus, "rootResource": focus, "env": env})
    norm = [fastpath.val(x) if not isinstance(fastpath.val(x), dict) else fastpath.val(x).get("id") for x in fast]
    slow_norm = [x.get("id") if isinstance(x, dict) else x for x in slow]
    assert slow_norm == norm, (expr, slow, fast)
    return slow


def test_has_value(env: fhirpath.Env) -> None:
    assert both("gender.hasValue()", PATIENT, env) == [True]
    assert both("birthDate.hasValue()", PATIENT, env) == [False]  # only the _birthDate extension


def test_get_value(env: fhirpath.Env) -> None:
    assert both("gender.getValue()", PATIENT, env) == ["male"]
    assert both("birthDate.getValue()", PATIENT, env) == []


def test_resolve_contained(env: fhirpath.Env) -> None:
    assert both("managingOrganization.resolve().name", PATIENT, env) == ["Clinic"]


def test_resolve_in_bundle(validator: Any) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
         "resource": {"resourceType": "Patient", "id": "a", "name": [{"family": "Karimov"}]}},
        {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
         "resource": {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}}}]}
    run = _Run()
    run.bundles.append(validator._bundle_index(run, bundle))
    env = validator._make_env(run)
    obs = bundle["entry"][1]["resource"]
    assert both("subject.resolve().name.family", obs, env) == ["Karimov"]
    assert both("subject.resolve() is Patient", obs, env) == [True]


def test_member_of(env: fhirpath.Env) -> None:
    assert both("gender.memberOf('http://hl7.org/fhir/ValueSet/administrative-gender')", PATIENT, env) == [True]
    bad = dict(PATIENT, gender="robot")
    assert both("gender.memberOf('http://hl7.org/fhir/ValueSet/administrative-gender')", bad, env) == [False]


def test_member_of_unknown_system_is_not_a_verdict(env: fhirpath.Env) -> None:
    coding = {"system": "http://loinc.org", "code": "1234-5"}
    with pytest.raises(fhirpath.NotEvaluable):
        fhirpath.evaluate("memberOf('http://hl7.org/fhir/ValueSet/observation-codes')", coding, "Coding", env)
    with pytest.raises(fastpath.Unsupported):
        fastpath.evaluate("memberOf('http://hl7.org/fhir/ValueSet/observation-codes')", coding, {"env": env})


def test_conforms_to(env: fhirpath.Env) -> None:
    assert both("conformsTo('http://hl7.org/fhir/StructureDefinition/Patient')", PATIENT, env) == [True]
    assert both("conformsTo('https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient')", PATIENT,
                env) == [False]  # no identifier


def test_low_and_high_boundary(env: fhirpath.Env) -> None:
    assert fhirpath.evaluate("lowBoundary()", Decimal("1.5"), None, env) == [Decimal("1.45")]
    assert fhirpath.evaluate("highBoundary()", Decimal("1.5"), None, env) == [Decimal("1.55")]
    assert fhirpath.evaluate("start.lowBoundary()", {"start": "2020-02"}, "Period", env) == ["2020-02-01"]
    assert fhirpath.evaluate("start.highBoundary()", {"start": "2020-02"}, "Period", env) == ["2020-02-29"]
    assert fhirpath.evaluate("start.highBoundary()", {"start": "2021"}, "Period", env) == ["2021-12-31"]


def test_matches_full(env: fhirpath.Env) -> None:
    assert both("id.matchesFull('[a-z0-9]+')", PATIENT, env) == [True]
    assert both("id.matchesFull('[a-z]+')", PATIENT, env) == [False]  # 'p1' has a digit: not a full match
    assert both("id.matches('[a-z]+')", PATIENT, env) == [True]


def test_html_checks(env: fhirpath.Env) -> None:
    good = {"div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>ok</p></div>'}
    bad = {"div": '<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script></div>'}
    assert both("`div`.htmlChecks()", good, env, "Narrative") == [True]
    assert both("`div`.htmlChecks()", bad, env, "Narrative") == [False]


@pytest.mark.parametrize("expr,expected", [
    ("name.exists() or telecom.exists()", [False]),
    ("gender = 'male' implies birthDate.exists()", [True]),  # _birthDate has an extension: it exists
    ("contained.count() = 1 and contained.first().id = 'org'", [True]),
    ("iif(gender = 'male', 'm', 'f')", ["m"]),
    ("contained.where(id = 'org').exists() and contained.all(name.exists())", [True]),
    ("(1 + 2) * 3 = 9 and 'a' & 'b' = 'ab' and 7 div 2 = 3 and 7 mod 2 = 1", [True]),
    ("gender in ('male' | 'female')", [True]),
    ("{}.empty() and {}.exists().not()", [True]),
    ("id.length() <= 64 and id.substring(0, 1) = 'p' and id.startsWith('p') and id.endsWith('1')", [True]),
])
def test_fast_path_agrees_with_fhirpathpy(expr: str, expected: list[Any], env: fhirpath.Env) -> None:
    assert both(expr, PATIENT, env) == expected


def test_fast_path_refuses_what_it_cannot_answer() -> None:
    with pytest.raises(fastpath.Unsupported):
        fastpath.compile_expr("today() > @2020-01-01")
    with pytest.raises(fastpath.Unsupported):  # a type question plain JSON cannot answer
        fastpath.evaluate("code.is(Coding)", {"code": {"system": "x", "code": "y"}}, {})


def test_unevaluable_constraint_is_reported_not_passed(validator: Any, registry: Any) -> None:
    """A profile invariant the engines cannot evaluate shows up as an issue, never as a silent pass."""
    from dhp.validation.plan import Constraint
    run = _Run()
    validator._invariants(run, [Constraint("x-1", "error", "weird", "name.frobnicate()", "")],
                          {"resourceType": "Patient", "name": [{"family": "A"}]}, "Patient", "Patient")
    assert [i.message_id for i in run.issues] == ["invariant-not-evaluated"]
    assert "x-1" in run.issues[0].diagnostics
