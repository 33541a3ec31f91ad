"""Hostile StructureDefinitions written through the REST API, over real HTTP on both backends.

A profile takes effect at once: one that cannot be used must be refused when it is written (422 naming the
problem), or make resources claiming it fail validation with a clear issue. Before the fixes, wrong JSON types
in a profile (stored with validation off) turned every later $validate into a 500, a baseDefinition cycle or
a Patient profile built on Observation was stored silently, and an exponential invariant blocked the server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
BASE = "http://hl7.org/fhir/StructureDefinition/"
EX = "http://example.org/fhir/StructureDefinition/"


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def fhir(request: pytest.FixtureRequest, start_server: Callable[..., Any],
         new_db_url: Callable[[str], str]) -> str:
    # Validation off on write: profiles are then stored without being checked against the StructureDefinition
    # resource definition, so only the usability check stands between a broken profile and the validator.
    s = start_server(DHP_DATABASE_URL=new_db_url(request.param), DHP_AUTH="off", DHP_VALIDATION="off",
                     DHP_PACKAGE_IMPORT="ig")
    return str(s.fhir)


def _sd(sid: str, diff: list[Any], base: str = BASE + "Patient", type_: str = "Patient") -> dict[str, Any]:
    return {"resourceType": "StructureDefinition", "id": sid, "url": EX + sid, "name": "P" + sid.replace("-", ""),
            "status": "draft", "kind": "resource", "abstract": False, "type": type_, "baseDefinition": base,
            "derivation": "constraint", "differential": {"element": diff}}


def _put(fhir: str, res: dict[str, Any]) -> httpx.Response:
    return httpx.put(f"{fhir}/{res['resourceType']}/{res['id']}", json=res, headers=FHIR_JSON, timeout=60)


def _validate(fhir: str, profile: str, **extra: Any) -> tuple[httpx.Response, list[tuple[str, str, str]]]:
    pat = {"resourceType": "Patient", "meta": {"profile": [EX + profile]}, "name": [{"family": "Aziz"}], **extra}
    r = httpx.post(f"{fhir}/Patient/$validate", json=pat, headers=FHIR_JSON, timeout=60)
    issues = [(i["severity"], i["details"]["coding"][0]["code"], i.get("diagnostics", ""))
              for i in r.json().get("issue", []) if i.get("details", {}).get("coding")]
    return r, issues


def _uid() -> str:
    return "h" + uuid.uuid4().hex[:10]


@pytest.mark.parametrize("element", [
    {"id": "Patient.name", "path": "Patient.name", "min": "abc"},
    {"id": "Patient.name", "path": "Patient.name", "max": "lots"},
    {"id": "Patient.name", "path": "Patient.name", "type": ["HumanName"]},
    {"id": "Patient.name", "path": "Patient.name", "type": {"code": "HumanName"}},
    {"id": "Patient.identifier", "path": "Patient.identifier", "slicing": "closed"},
    {"id": "Patient.identifier", "path": "Patient.identifier", "slicing": {"discriminator": ["system"]}},
    {"id": "Patient.gender", "path": "Patient.gender", "binding": {"strength": "required", "valueSet": 5}},
    {"id": "Patient.gender", "path": "Patient.gender", "binding": "required"},
    {"id": "Patient", "path": "Patient", "constraint": ["x-1"]},
    {"id": "Patient", "path": "Patient", "constraint": [{"key": "x-1", "severity": "error", "expression": 5}]},
    {"id": "Patient.name.family", "path": "Patient.name.family", "maxLength": "5"},
    {"id": "Patient.name", "min": 1},
    "Patient.name",
])
def test_wrong_json_types_in_a_profile_are_refused_and_never_a_500(fhir: str, element: Any) -> None:
    # Stored with validation off, each of these made $validate of a Patient claiming the profile a 500.
    sid = _uid()
    r = _put(fhir, _sd(sid, [element]))
    assert r.status_code == 422, r.text
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "profile-unusable"
    v, issues = _validate(fhir, sid)
    assert v.status_code == 200, v.text
    assert any(code == "profile-unknown" for _s, code, _d in issues)


def test_wrong_json_types_in_a_snapshot_are_refused(fhir: str) -> None:
    sid = _uid()
    sd = _sd(sid, [])
    del sd["differential"]
    sd["snapshot"] = {"element": [{"id": "Patient", "path": "Patient"}, {"id": "Patient.name", "path": "Patient.name",
                                                                        "min": "x"}]}
    r = _put(fhir, sd)
    assert r.status_code == 422, r.text
    assert "min must be" in r.json()["issue"][0]["diagnostics"]


def test_base_definition_cycle_is_refused_and_the_profile_left_behind_is_reported(fhir: str) -> None:
    a, b = _uid(), _uid()
    # a's base does not exist yet: allowed (it may be created next) ...
    assert _put(fhir, _sd(a, [{"id": "Patient.name", "path": "Patient.name", "min": 1}], base=EX + b)).status_code \
        in (200, 201)
    # ... but b on a closes a cycle
    r = _put(fhir, _sd(b, [{"id": "Patient.name", "path": "Patient.name", "min": 1}], base=EX + a))
    assert r.status_code == 422, r.text
    assert "cycle" in r.json()["issue"][0]["diagnostics"]
    selfish = _uid()
    r = _put(fhir, _sd(selfish, [{"id": "Patient.name", "path": "Patient.name", "min": 1}], base=EX + selfish))
    assert r.status_code == 422 and "cycle" in r.json()["issue"][0]["diagnostics"]
    # a is stored but cannot be used: said so, not "unknown profile"
    v, issues = _validate(fhir, a)
    assert v.status_code == 200
    hits = [(sev, d) for sev, code, d in issues if code == "profile-unusable"]
    assert hits and hits[0][0] == "error" and "is not known" in hits[0][1], issues


def test_profile_whose_base_is_another_type_is_refused(fhir: str) -> None:
    # type Patient on an Observation base: Patients were checked against Observation's elements.
    r = _put(fhir, _sd(_uid(), [{"id": "Observation.status", "path": "Observation.status"}],
                       base=BASE + "Observation"))
    assert r.status_code == 422, r.text
    assert "not the profiled type Patient" in r.json()["issue"][0]["diagnostics"]


def test_element_not_in_the_base_is_refused(fhir: str) -> None:
    r = _put(fhir, _sd(_uid(), [{"id": "Patient.nonsense", "path": "Patient.nonsense", "min": 1}]))
    assert r.status_code == 422, r.text
    assert "Patient.nonsense" in r.json()["issue"][0]["diagnostics"]


def test_invariant_that_does_not_parse_is_refused(fhir: str) -> None:
    # fhirpathpy recovers from syntax errors silently: the constraint was stored, then never evaluable.
    r = _put(fhir, _sd(_uid(), [{"id": "Patient", "path": "Patient", "constraint": [
        {"key": "x-1", "severity": "error", "human": "h", "expression": "name.where((("}]}]))
    assert r.status_code == 422, r.text
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "invariant-syntax"


def test_exponential_invariant_is_stopped_with_an_error(fhir: str) -> None:
    # 20^6 steps: minutes of blocked event loop before the budget.
    sid = _uid()
    expr = "telecom" + ".select(%resource.telecom" * 5 + ")" * 5 + ".count() > 0"
    r = _put(fhir, _sd(sid, [{"id": "Patient", "path": "Patient", "constraint": [
        {"key": "x-1", "severity": "error", "human": "h", "expression": expr}]}]))
    assert r.status_code in (200, 201), r.text
    v, issues = _validate(fhir, sid, telecom=[{"system": "phone", "value": str(i)} for i in range(20)])
    assert v.status_code == 200
    assert any(s == "error" and code == "invariant-too-costly" for s, code, _d in issues), issues


def test_chained_where_is_linear(fhir: str) -> None:
    # where() evaluated its input twice: 2^40 evaluations for 40 chained where() calls (now over the step
    # budget: the invariant would be reported too costly instead of evaluated).
    sid = _uid()
    expr = "telecom" + ".where(value.exists())" * 40 + ".exists()"
    r = _put(fhir, _sd(sid, [{"id": "Patient", "path": "Patient", "constraint": [
        {"key": "x-1", "severity": "error", "human": "h", "expression": expr}]}]))
    assert r.status_code in (200, 201), r.text
    v, issues = _validate(fhir, sid, telecom=[{"system": "phone", "value": "1"}])
    assert v.status_code == 200
    assert not [i for i in issues if "x-1" in i[2]], issues  # evaluated, and true


def _invariant(sid: str, expr: str, key: str = "x-1") -> dict[str, Any]:
    return _sd(sid, [{"id": "Patient", "path": "Patient", "constraint": [
        {"key": key, "severity": "error", "human": "h", "expression": expr}]}])


@pytest.mark.parametrize("expr", [
    "name.family.matches('(a+)+$')",
    "name.family.replaceMatches('(a|aa)*$', '') = ''",
    "name.family.matchesFull('(.*a){12}')",
])
def test_catastrophic_regex_in_an_invariant_is_refused_at_create(fhir: str, expr: str) -> None:
    # Python's re has no timeout: (a+)+$ against 'aaaa…b' blocked the event loop for minutes.
    r = _put(fhir, _invariant(_uid(), expr))
    assert r.status_code == 422, r.text
    issue = r.json()["issue"][0]
    assert issue["details"]["coding"][0]["code"] == "invariant-regex-refused"
    assert "x-1" in issue["diagnostics"] and "refused" in issue["diagnostics"]


def test_catastrophic_regex_reached_at_run_time_is_reported_not_run(fhir: str) -> None:
    # The pattern is not a literal (it comes from the resource), so only the run-time vetting can stop it.
    sid = _uid()
    r = _put(fhir, _invariant(sid, "name.family.matches(%resource.name.given.first())"))
    assert r.status_code in (200, 201), r.text
    v, issues = _validate(fhir, sid, name=[{"family": "a" * 40 + "b", "given": ["(a+)+$"]}])
    assert v.status_code == 200
    hits = [(s, d) for s, code, d in issues if code == "invariant-regex-refused"]
    assert hits and hits[0][0] == "error" and "x-1" in hits[0][1], issues
    # A vetted pattern runs as before.
    v, issues = _validate(fhir, sid, name=[{"family": "Aziz", "given": ["^Az"]}])
    assert v.status_code == 200
    assert not [i for i in issues if "x-1" in i[2]], issues


def test_conforms_to_shares_the_budget_of_the_invariant_that_calls_it(fhir: str) -> None:
    # Each conformsTo() evaluation used to start with a fresh step budget: 20 contained resources × 20^4 steps
    # in the nested profile's invariant (3.2M) ran in full under an outer invariant allowed 1M.
    inner, outer = _uid(), _uid()
    costly = "telecom" + ".select(%resource.telecom" * 3 + ")" * 3 + ".count() > 0"
    assert _put(fhir, _invariant(inner, costly, key="in-1")).status_code in (200, 201)
    r = _put(fhir, _invariant(outer, f"contained.all(conformsTo('{EX + inner}'))", key="out-1"))
    assert r.status_code in (200, 201), r.text
    telecom = [{"system": "phone", "value": str(i)} for i in range(20)]
    contained = [{"resourceType": "Patient", "id": f"c{i}", "telecom": telecom} for i in range(20)]
    v, issues = _validate(fhir, outer, contained=contained)
    assert v.status_code == 200
    assert any(s == "error" and code == "invariant-too-costly" and "out-1" in d for s, code, d in issues), issues


def _slices(sid: str, n: int) -> dict[str, Any]:
    diff: list[Any] = [{"id": "Patient.identifier", "path": "Patient.identifier",
                        "slicing": {"discriminator": [{"type": "value", "path": "system"}], "rules": "open"}}]
    diff += [{"id": f"Patient.identifier:s{i}", "path": "Patient.identifier", "sliceName": f"s{i}",
              "max": "1"} for i in range(n)]
    return _sd(sid, diff)


def _snapshot_calls(registry: Any, n: int) -> int:
    """C-level calls (id comparisons, prefix tests, copies) made generating the snapshot of n slices."""
    import sys

    from dhp.validation.snapshot import generate_snapshot

    sd = _slices("calls", n)
    calls = 0

    def count(_frame: Any, event: str, _arg: Any) -> None:
        nonlocal calls
        if event == "c_call":
            calls += 1

    sys.setprofile(count)
    try:
        out = generate_snapshot(sd, registry)
    finally:
        sys.setprofile(None)
    assert len(out["snapshot"]["element"]) > n
    return calls


def test_snapshot_generation_is_near_linear_in_the_differential(registry: Any) -> None:
    # Each new slice scanned every element before it (index, subtree end): 5,000 slices took 4 s of event loop.
    # Counted in work, not time: twice the slices must cost about twice the calls (it was four times).
    small, large = _snapshot_calls(registry, 400), _snapshot_calls(registry, 1600)
    assert large < 6 * small, (small, large)


def test_profile_with_thousands_of_slices_is_usable(fhir: str) -> None:
    sid = _uid()
    r = _put(fhir, _slices(sid, 4_990))
    assert r.status_code in (200, 201), r.text
    v, issues = _validate(fhir, sid, identifier=[{"system": "urn:x", "value": "1"}])
    assert v.status_code == 200
    assert not [i for i in issues if i[1] in ("profile-unusable", "profile-unknown")], issues
