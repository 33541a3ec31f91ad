"""One invalid variant per rule: each is refused with 422 naming the rule, the entry index and the path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.documents import fixtures as fx
from tests.documents.helpers import post

Mutation = Callable[[dict[str, Any]], None]


def comp(b: dict[str, Any]) -> dict[str, Any]:
    return b["entry"][0]["resource"]


def _swap_first(b: dict[str, Any]) -> None:
    b["entry"][0], b["entry"][1] = b["entry"][1], b["entry"][0]


def _dup_fullurl(b: dict[str, Any]) -> None:
    b["entry"][5]["fullUrl"] = b["entry"][4]["fullUrl"]


def _no_place_of_birth(b: dict[str, Any]) -> None:
    b["entry"][1]["resource"]["extension"] = b["entry"][1]["resource"]["extension"][1:]


def _weight_not_ucum(b: dict[str, Any]) -> None:
    b["entry"][7]["resource"]["valueQuantity"]["system"] = "http://example.org/units"


def _weight_as_string(b: dict[str, Any]) -> None:
    obs = b["entry"][7]["resource"]
    del obs["valueQuantity"]
    obs["valueString"] = "2450 g"


def _mother_no_education(b: dict[str, Any]) -> None:
    b["entry"][4]["resource"].pop("extension")


def _encounter_of_the_mother(b: dict[str, Any]) -> None:
    # encounter-birth's subject must be a patient-birth (the newborn), not the mother.
    b["entry"][6]["resource"]["subject"] = {"reference": b["entry"][3]["fullUrl"]}


def _stillborn_without_reason(b: dict[str, Any]) -> None:
    b["entry"][2]["resource"]["identifier"] = [{}]


def _bad_status(b: dict[str, Any]) -> None:
    comp(b)["status"] = "registered"


def _no_attester(b: dict[str, Any]) -> None:
    comp(b).pop("attester")


def _no_comp_identifier(b: dict[str, Any]) -> None:
    comp(b).pop("identifier")


def _long_comp_identifier(b: dict[str, Any]) -> None:
    ident = comp(b)["identifier"]
    (ident[0] if isinstance(ident, list) else ident)["system"] = "urn:x:" + "s" * 600


def _dangling_section_entry(b: dict[str, Any]) -> None:
    comp(b)["section"][0]["entry"].append({"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"})


def _unknown_server_subject(b: dict[str, Any]) -> None:
    comp(b)["subject"][1] = {"reference": "Patient/no-such-patient"}


def _empty_section(b: dict[str, Any]) -> None:
    comp(b)["section"].append({"title": "Bo'sh"})


def _empty_reason_with_entries(b: dict[str, Any]) -> None:
    comp(b)["section"][0]["emptyReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                                                        "code": "unavailable"}]}


def _dangling_entry_reference(b: dict[str, Any]) -> None:
    b["entry"][7]["resource"]["subject"] = {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}


CASES: list[tuple[str, Mutation, str, str]] = [
    # (name, mutation, message id expected among the issues, expression fragment expected)
    ("no Bundle.identifier (bdl-9)", lambda b: b.pop("identifier"), "doc-identifier", "Bundle.identifier"),
    ("no Bundle.timestamp (bdl-10)", lambda b: b.pop("timestamp"), "doc-timestamp", "Bundle.timestamp"),
    ("first entry not a Composition (bdl-11)", _swap_first, "doc-first-composition", "Bundle.entry[0]"),
    ("entry without fullUrl (bdl-15)", lambda b: b["entry"][3].pop("fullUrl"), "doc-fullurl", "Bundle.entry[3].fullUrl"),
    ("repeated fullUrl (bdl-7)", _dup_fullurl, "doc-fullurl-duplicate", "Bundle.entry[5].fullUrl"),
    ("entry with request (bdl-3a)", lambda b: b["entry"][2].__setitem__("request", {"method": "POST", "url": "Patient"}),
     "doc-entry-request", "Bundle.entry[2]"),
    ("Bundle.issues (bdl-17)", lambda b: b.__setitem__("issues", {"resourceType": "OperationOutcome", "issue": []}),
     "doc-issues", "Bundle.issues"),
    ("status outside the life cycle", _bad_status, "doc-status", "Bundle.entry[0].resource.ofType(Composition).status"),
    ("final without attester", _no_attester, "doc-attester", "Bundle.entry[0].resource.ofType(Composition).attester"),
    ("no Composition.identifier", _no_comp_identifier, "doc-composition-identifier",
     "Bundle.entry[0].resource.ofType(Composition).identifier"),
    # Longer than the document registry keeps (PostgreSQL would refuse it; SQLite would not): refused alike.
    ("Bundle.identifier value too long", lambda b: b["identifier"].__setitem__("value", "v" * 600),
     "doc-identifier-too-long", "Bundle.identifier"),
    ("Composition.identifier system too long", _long_comp_identifier, "doc-identifier-too-long",
     "Bundle.entry[0].resource.ofType(Composition).identifier"),
    ("entry fullUrl too long", lambda b: b["entry"][9].__setitem__("fullUrl", "urn:uuid:" + "0" * 1000),
     "doc-fullurl-too-long", "Bundle.entry[9].fullUrl"),
    ("section entry pointing nowhere", _dangling_section_entry, "doc-reference-unresolved",
     "Bundle.entry[0].resource.ofType(Composition).section[0].entry[2]"),
    ("subject not on the server", _unknown_server_subject, "doc-reference-unresolved",
     "Bundle.entry[0].resource.ofType(Composition).subject[1]"),
    ("entry reference pointing nowhere", _dangling_entry_reference, "doc-reference-unresolved",
     "Bundle.entry[7].resource.ofType(Observation).subject"),
    ("empty section (cmp-1)", _empty_section, "cmp-1", "Bundle.entry[0].resource.ofType(Composition).section[4]"),
    ("emptyReason with entries (cmp-2)", _empty_reason_with_entries, "cmp-2", "section[0].emptyReason"),
    ("patient-birth: no place-of-birth type", _no_place_of_birth, "", "Bundle.entry[1].resource.ofType(Patient)"),
    ("patient-birth: identifier neither present nor absent-with-reason", _stillborn_without_reason, "",
     "Bundle.entry[2].resource.ofType(Patient).identifier"),
    ("observation-birth: unit system not UCUM", _weight_not_ucum, "",
     "Bundle.entry[7].resource.ofType(Observation).value"),
    ("observation-birth: value not a Quantity", _weight_as_string, "", "Bundle.entry[7].resource.ofType(Observation)"),
    ("related-person-birth: no education", _mother_no_education, "", "Bundle.entry[4].resource.ofType(RelatedPerson)"),
    ("encounter-birth: subject is not the newborn", _encounter_of_the_mother, "",
     "Bundle.entry[6].resource.ofType(Encounter).subject"),
]


@pytest.mark.parametrize("name,mutate,message_id,where", CASES, ids=[c[0] for c in CASES])
def test_form096_rule(client: httpx.Client, name: str, mutate: Mutation, message_id: str, where: str) -> None:
    bundle = fx.form_096()
    mutate(bundle)
    r = post(client, bundle)
    assert r.status_code == 422, f"{name}: {r.status_code} {r.text[:500]}"
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    errors = [i for i in oo["issue"] if i["severity"] in ("error", "fatal")]
    assert errors
    if message_id:
        ids = [(i.get("details") or {}).get("coding", [{}])[0].get("code") for i in errors]
        assert message_id in ids, ids
    exprs = [x for i in errors for x in i.get("expression") or ()]
    assert any(where in x for x in exprs), exprs
    ident = bundle.get("identifier") or {}
    if ident:
        got = client.get("/Bundle", params={"identifier": f"{ident['system']}|{ident['value']}"}).json()
        assert not got.get("entry")


def test_all_problems_are_listed_at_once(client: httpx.Client) -> None:
    bundle = fx.form_096()
    _no_attester(bundle)
    _weight_not_ucum(bundle)
    _mother_no_education(bundle)
    bundle["entry"][3].pop("fullUrl")
    r = post(client, bundle)
    assert r.status_code == 422
    exprs = " ".join(x for i in r.json()["issue"] if i["severity"] == "error" for x in i.get("expression") or ())
    for where in ("Composition).attester", "Bundle.entry[7]", "Bundle.entry[4]", "Bundle.entry[3].fullUrl"):
        assert where in exprs


FORM003: list[tuple[str, Mutation, str]] = [
    ("no diagnoses section", lambda b: comp(b).__setitem__(
        "section", [s for s in comp(b)["section"] if s["code"]["coding"][0]["code"] != "diagnoses"]),
     "Bundle.entry[0].resource.ofType(Composition).section"),
    ("wrong category", lambda b: comp(b)["category"][0]["coding"][0].__setitem__("code", "form-096"),
     "Bundle.entry[0].resource.ofType(Composition).category"),
    ("disposition without narrative (form003-2)", lambda b: comp(b)["section"][5].update(
        {"text": None, "entry": [{"reference": b["entry"][2]["fullUrl"]}]}) or comp(b)["section"][5].pop("text"),
     "Bundle.entry[0].resource.ofType(Composition)"),
    ("diagnosis without ICD-10 code system", lambda b: b["entry"][3]["resource"]["code"]["coding"][0].__setitem__(
        "system", "http://example.org/not-icd"), "Bundle.entry[3].resource.ofType(Condition).code"),
    ("no encounter", lambda b: comp(b).pop("encounter"), "Bundle.entry[0].resource.ofType(Composition)"),
]


@pytest.mark.parametrize("name,mutate,where", FORM003, ids=[c[0] for c in FORM003])
def test_form003_rule(client: httpx.Client, name: str, mutate: Mutation, where: str) -> None:
    bundle = fx.form_003()
    mutate(bundle)
    r = post(client, bundle)
    assert r.status_code == 422, f"{name}: {r.status_code} {r.text[:500]}"
    exprs = [x for i in r.json()["issue"] if i["severity"] == "error" for x in i.get("expression") or ()]
    assert any(where in x for x in exprs), exprs
