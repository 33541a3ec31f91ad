"""Hostile or broken SearchParameters written through the API, on SQLite and PostgreSQL: refused at create or
update with a 422 naming the problem, never a 500, and never a server whose later writes or searches fail."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer

H = {"Content-Type": "application/fhir+json"}
STRICT = {"Prefer": "handling=strict"}


@pytest.fixture()
def fhir(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.fhir, timeout=60) as c:
        yield c


def sp(**kw: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    r: dict[str, Any] = {"resourceType": "SearchParameter", "id": f"hostile-{tag}", "status": "active",
                         "name": "hostile", "url": f"http://dhp.test/SearchParameter/hostile-{tag}",
                         "code": f"hostile-{tag}", "base": ["Patient"], "type": "string", "description": "x",
                         "expression": "Patient.name.family"}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def still_serving(c: httpx.Client) -> None:
    """Ordinary writes and searches of the parameter's base type still work."""
    pid = "hostile-pat-" + uuid.uuid4().hex[:8]
    r = c.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "other",
                                       "name": [{"family": "Hostile"}]}, headers=H)
    assert r.status_code == 201, r.text
    r = c.get(f"/Patient?_id={pid}&gender=other&family=hostile")
    assert r.status_code == 200, r.text
    assert [e["resource"]["id"] for e in r.json().get("entry", [])] == [pid]
    assert c.delete(f"/Patient/{pid}").status_code in (200, 204)


def refused(c: httpx.Client, body: dict[str, Any], words: str) -> None:
    r = c.put(f"/SearchParameter/{body['id']}", json=body, headers=H)
    assert r.status_code == 422, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert words in oo["issue"][0]["diagnostics"], oo
    assert c.get(f"/SearchParameter/{body['id']}").status_code == 404  # nothing was stored
    still_serving(c)


# Wrong JSON types made loading the definitions raise: the create answered 500 after committing, and from then
# on every write and search of every type did too (the server could not even restart).
@pytest.mark.parametrize(("kw", "words"), [
    ({"type": "composite", "expression": "Patient", "component": ["gender"]}, "component[0]"),
    ({"type": "composite", "expression": "Patient", "component": [{"definition": 5, "expression": 7}]},
     "component[0]"),
    ({"expression": 5}, "expression must be a string"),
    ({"expression": ["Patient.name"]}, "expression must be a string"),
    ({"target": "Practitioner", "type": "reference", "expression": "Patient.generalPractitioner"}, "target"),
    ({"modifier": "exact"}, "modifier"),
    ({"chain": 5}, "chain"),
    ({"base": "Patient"}, "base"),
    ({"type": 5}, "type"),
])
def test_wrong_json_types_are_refused_not_a_500(fhir: httpx.Client, kw: dict[str, Any], words: str) -> None:
    refused(fhir, sp(**kw), words)


# These were stored (201) and then searched as if nothing matched, or (a lexer error) failed every write.
@pytest.mark.parametrize(("expression", "words"), [
    ("Patient.name.where((", "does not parse"),
    ("Patient.name #", "does not parse"),
    ("Patient.name.frobnicate()", "frobnicate() is not supported"),
    ("Patient.generalPractitioner.resolve()", "resolve()"),
    ("Patient.name.family.where($this.matches('(a+)+$'))", "matches()"),
    ("Observation.status", "finds nothing on base Patient"),
    ("Patient.name.family" + " | Patient.name.family" * 600, "more than"),
])
def test_expressions_that_cannot_be_evaluated_are_refused(fhir: httpx.Client, expression: str, words: str) -> None:
    refused(fhir, sp(expression=expression), words)


@pytest.mark.parametrize(("kw", "words"), [
    ({"type": "banana"}, "not a search parameter type"),
    ({"base": ["NotAType"]}, "not a resource type"),
    ({"type": "reference", "expression": "Patient.generalPractitioner", "target": ["Nobody"]},
     "not a resource type"),
    ({"code": "a b|c,d$e"}, "cannot be a search parameter name"),
    ({"code": ""}, "cannot be a search parameter name"),
    ({"expression": None}, "expression is required"),
    ({"type": "composite", "expression": "Patient", "component": [
        {"definition": "http://hl7.org/fhir/SearchParameter/Patient-gender", "expression": "gender"}] * 4},
     "at most 3"),
])
def test_definitions_searched_silently_wrong_are_refused(fhir: httpx.Client, kw: dict[str, Any],
                                                         words: str) -> None:
    refused(fhir, sp(**kw), words)


def test_a_second_definition_of_the_same_code_is_refused(fhir: httpx.Client) -> None:
    """Two API-written parameters with one code and base: only one would be used, the other searched silently
    as if it were the first. The second is refused; the first can still be updated."""
    first = sp()
    assert fhir.put(f"/SearchParameter/{first['id']}", json=first, headers=H).status_code == 201
    try:
        second = sp(code=first["code"], type="token", expression="Patient.gender")
        refused(fhir, second, f"SearchParameter/{first['id']} already defines")
        first["description"] = "updated"
        assert fhir.put(f"/SearchParameter/{first['id']}", json=first, headers=H).status_code == 200
    finally:
        assert fhir.delete(f"/SearchParameter/{first['id']}").status_code in (200, 204)


def test_a_definition_stored_without_the_checks_does_not_break_the_server(
        fhir: httpx.Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One stored before the create-time checks existed (or by another path) is skipped when the definitions
    load, with a warning: its own write, later writes and searches, and its delete, all work."""
    monkeypatch.setattr(server.server.search, "check_definition", lambda _sp: [])
    bodies = [sp(type="composite", expression="Patient", component=["gender"]), sp(expression=5),
              sp(expression="Patient.name #")]
    try:
        for b in bodies:
            r = fhir.put(f"/SearchParameter/{b['id']}", json=b, headers=H)
            assert r.status_code == 201, r.text
        still_serving(fhir)
        # The one that does not compile is reported as unsupported, not searched as if nothing matched.
        r = fhir.get(f"/Patient?{bodies[2]['code']}=x", headers=STRICT)
        assert r.status_code == 400, r.text
    finally:
        for b in bodies:
            assert fhir.delete(f"/SearchParameter/{b['id']}").status_code in (200, 204)
    still_serving(fhir)


def test_a_valid_parameter_is_still_accepted(fhir: httpx.Client) -> None:
    body = sp(expression="Patient.name.where(use = 'official').family | Patient.extension('http://x').value")
    r = fhir.put(f"/SearchParameter/{body['id']}", json=body, headers=H)
    assert r.status_code == 201, r.text
    try:
        still_serving(fhir)
    finally:
        assert fhir.delete(f"/SearchParameter/{body['id']}").status_code in (200, 204)
