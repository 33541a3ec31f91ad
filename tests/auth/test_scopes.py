"""SMART scope parsing, granting and the resource checks (compartment, granular query) — in-process."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dhp.auth.compartment import Compartments, check_resource
from dhp.auth.scopes import Principal, ScopeError, grant, parse_resource_scope, validate_scopes
from dhp.errors import FHIRError


def test_v2_scope_parses() -> None:
    s = parse_resource_scope("patient/Observation.rs?category=laboratory")
    assert s is not None
    assert (s.context, s.type, s.perms, s.query) == ("patient", "Observation", frozenset("rs"),
                                                     (("category", "laboratory"),))
    assert parse_resource_scope("system/*.cruds").perms == frozenset("cruds")  # type: ignore[union-attr]


@pytest.mark.parametrize("v1,perms", [("user/*.read", "rs"), ("user/Patient.write", "cud"), ("system/*.*", "cruds")])
def test_v1_scopes_map_to_v2(v1: str, perms: str) -> None:
    assert parse_resource_scope(v1).perms == frozenset(perms)  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["patient/Observation.sr", "user/*.x", "nurse/*.rs", "system/observation.rs",
                                 "user/*.read?category=x", "patient/Observation.rs?", "user/*."])
def test_malformed_scopes_are_rejected(bad: str) -> None:
    with pytest.raises(ScopeError):
        validate_scopes([bad])


def test_non_resource_scopes_are_known() -> None:
    validate_scopes(["openid", "fhirUser", "profile", "launch/patient", "offline_access", "dhp/admin"])
    with pytest.raises(ScopeError):
        validate_scopes(["email"])


def test_grant_narrows_and_drops() -> None:
    allowed = ["user/*.rs", "system/Patient.cruds", "openid"]
    got = grant(["user/Observation.cruds", "user/Patient.read", "system/Patient.r", "openid", "fhirUser"], allowed,
                contexts=frozenset({"user"}))
    # cruds narrowed to rs; system scope dropped (context); fhirUser not registered and not an extra.
    assert got == ["user/Observation.rs", "user/Patient.read", "openid"]
    assert grant(["user/*.cruds"], ["user/Observation.rs?category=laboratory"], contexts=frozenset({"user"})) == []
    assert grant(["user/Observation.rs?category=laboratory"], ["user/Observation.rs?category=laboratory"],
                 contexts=frozenset({"user"})) == ["user/Observation.rs?category=laboratory"]


def test_principal_can_and_filters() -> None:
    p = Principal(client_id="c", sub="u", patient="p1",
                  scopes=["patient/Observation.rs?category=laboratory", "patient/Observation.rs?category=vital-signs",
                          "user/Patient.r", "launch/patient"])
    assert p.can("r", "Observation") and p.can("s", "Observation")
    assert not p.can("c", "Observation") and not p.can("r", "Condition") and not p.can("s", "Patient")
    assert p.query_filters("s", "Observation") == [[("category", "laboratory")], [("category", "vital-signs")]]
    assert p.query_filters("r", "Patient") is None
    assert p.compartment("r", "Observation") == "p1"
    assert p.compartment("r", "Patient") is None
    # patient/ scopes mean nothing without a patient in context.
    assert not Principal(client_id="c", sub="u", scopes=["patient/*.rs"]).can("r", "Observation")


@pytest.fixture(scope="module")
def fake_server(registry: Any) -> Any:
    return SimpleNamespace(registry=registry, auth=SimpleNamespace(compartments=Compartments(registry)))


def obs(subject: str, category: str = "laboratory") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o1", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"text": "x"}, "subject": {"reference": subject}}


def test_patient_compartment_from_compartment_definition(fake_server: Any) -> None:
    p = Principal(client_id="c", sub="u", patient="p1", scopes=["patient/*.cruds"])
    check_resource(fake_server, p, "r", obs("Patient/p1"))
    check_resource(fake_server, p, "r", {"resourceType": "Patient", "id": "p1"})
    check_resource(fake_server, p, "c", {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p1"},
                                         "code": {"text": "x"}})
    # Encounter.subject is a compartment param too; absolute references count.
    check_resource(fake_server, p, "u", {"resourceType": "Encounter", "id": "e", "status": "planned",
                                         "subject": {"reference": "http://x/fhir/Patient/p1"}})
    for res in (obs("Patient/p2"), {"resourceType": "Patient", "id": "p2"},
                {"resourceType": "Condition", "subject": {"reference": "Group/p1"}}):
        with pytest.raises(FHIRError) as e:
            check_resource(fake_server, p, "r", res)
        assert e.value.status == 403
    # Not patient data: readable through patient/, not writable.
    check_resource(fake_server, p, "r", {"resourceType": "Medication", "id": "m"})
    with pytest.raises(FHIRError):
        check_resource(fake_server, p, "c", {"resourceType": "Medication", "id": "m"})


def test_granular_scope_filters_resources(fake_server: Any) -> None:
    p = Principal(client_id="c", sub="u", patient="p1", scopes=["patient/Observation.rs?category=laboratory"])
    check_resource(fake_server, p, "r", obs("Patient/p1"))
    with pytest.raises(FHIRError):
        check_resource(fake_server, p, "r", obs("Patient/p1", "vital-signs"))
    sys_scoped = Principal(client_id="c", sub="c", scopes=[
        "system/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"])
    check_resource(fake_server, sys_scoped, "r", obs("Patient/p9", "vital-signs"))
    with pytest.raises(FHIRError):
        check_resource(fake_server, sys_scoped, "r", obs("Patient/p9"))


def test_user_scope_is_not_limited_to_the_compartment(fake_server: Any) -> None:
    p = Principal(client_id="c", sub="u", patient="p1", scopes=["patient/*.rs", "user/Observation.rs"])
    check_resource(fake_server, p, "r", obs("Patient/other"))
    with pytest.raises(FHIRError):
        check_resource(fake_server, p, "r", {"resourceType": "Condition", "subject": {"reference": "Patient/other"}})
