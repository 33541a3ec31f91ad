"""Regressions found by differential testing (SQLite against PostgreSQL) and fuzzing of search requests."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.search.test_search_http import get, ids


@pytest.mark.parametrize("exp", ["1e999999999", "1E+1000000000", "1e-999999999"])
def test_numbers_with_huge_exponents_are_searched_not_a_server_error(fhir: httpx.Client, exp: str) -> None:
    # Valid decimals whose implied range overflowed decimal's default context: a 500 instead of a search.
    big = not exp.endswith("e-999999999")
    everything = {"risk1", "risk2"}
    assert set(ids(get(fhir, "/RiskAssessment", params={"probability": f"lt{exp}"}))) == (
        everything if big else set())
    assert set(ids(get(fhir, "/RiskAssessment", params={"probability": f"gt{exp}"}))) == (
        set() if big else everything)
    assert ids(get(fhir, "/RiskAssessment", params={"probability": exp})) == []
    assert ("obs1" in ids(get(fhir, "/Observation", params={"value-quantity": f"gt{exp}"}))) is not big
    got = ids(get(fhir, "/Observation", params={"component-code-value-quantity": f"8480-6$gt{exp}"}))
    assert got == ([] if big else ["obs4"])


@pytest.mark.parametrize("value", ["inf|0", "1e999|69", "-inf|-inf|-inf", "nan|69", "41.3|69.3|nan", "91|69",
                                   "41.3|181", "41.3|69.3|-1", "41.3|69.3|inf"])
def test_near_with_impossible_coordinates_is_a_400_naming_near(fhir: httpx.Client, value: str) -> None:
    # An infinite latitude reached math.cos in the distance formula and raised: a 500.
    oo = get(fhir, "/Location", status=400, params={"near": value})
    assert oo["issue"][0]["expression"] == ["near"], oo


def test_near_still_finds_what_is_near(fhir: httpx.Client) -> None:
    assert ids(get(fhir, "/Location", params={"near": "41.3111|69.2797|5|km"})) == ["loc1"]


def _walk(fhir: httpx.Client, url: str, params: dict[str, str]) -> list[str]:
    """Ids of every page, following the next links."""
    out: list[str] = []
    b = get(fhir, url, params=params)
    while True:
        out += ids(b)
        nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
        if not nxt:
            return out
        b = get(fhir, nxt[0])


@pytest.mark.parametrize("count", ["1", "2"])
def test_paging_past_an_infinite_sort_value(fhir: httpx.Client, count: str) -> None:
    # A value beyond float range sorts as ±infinity; the cursor wrote it as JSON null ("no value"), so the next
    # page skipped straight to resources without a value: every later finite value was lost.
    values = {"inf1": "1e400", "inf2": "5", "inf3": "-1e400", "inf4": "1e400", "inf5": "7"}
    for rid, v in values.items():
        # The raw text: a Python float cannot spell 1e400, and the server must read it as a decimal.
        body = json.dumps({"resourceType": "Observation", "id": rid, "status": "final",
                           "code": {"coding": [{"system": "http://dhp.test/cs", "code": "inf-paging"}]},
                           "valueQuantity": {"value": "VALUE", "code": "mg"}}).replace('"VALUE"', v)
        r = fhir.put(f"/Observation/{rid}", content=body, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code in (200, 201), r.text
    up = ["inf3", "inf2", "inf5", "inf1", "inf4"]
    down = ["inf1", "inf4", "inf5", "inf2", "inf3"]
    params = {"code": "http://dhp.test/cs|inf-paging", "_count": count}
    assert _walk(fhir, "/Observation", {**params, "_sort": "value-quantity"}) == up
    assert _walk(fhir, "/Observation", {**params, "_sort": "-value-quantity"}) == down
    assert _walk(fhir, "/Observation", {**params, "_sort": "-value-quantity,_id"}) == down


def _cursor(key: list[object]) -> str:
    # The standard library's json: orjson refuses integers beyond 64 bits, which a hand-made cursor may hold.
    return base64.urlsafe_b64encode(json.dumps({"k": key, "b": False}).encode()).decode().rstrip("=")


@pytest.mark.parametrize(("query", "key"), [
    ("/Patient?_count=2", [1]), ("/Patient?_count=2", [{"a": 1}]), ("/Patient?_count=2", [[1, 2]]),
    ("/Patient?_count=2", [True]), ("/Patient?_count=2", [None]), ("/Patient?_count=2", ["p\u0000"]),
    ("/Patient?gender=male&_count=2", [5]), ("/Patient?_sort=birthdate&_count=2", [0, "abc", "pat1"]),
    ("/Patient?_sort=birthdate&_count=2", [0, 2 ** 70, "pat1"]), ("/Patient?_sort=birthdate&_count=2", [0, 1.5, "pat1"]),
    ("/Patient?_sort=family&_count=2", [0, 5, "pat1"]), ("/Patient?_sort=family&_count=2", ["x", "a", "pat1"]),
    ("/Patient?_sort=_lastUpdated&_count=2", [0, "abc", "pat1"]), ("/?_type=Patient,Practitioner&_count=2", [1, 2]),
    ("/RiskAssessment?_sort=probability&_count=1", [0, "abc", "risk1"]),
    ("/RiskAssessment?_sort=probability&_count=1", [0, {"f": "huge"}, "risk1"]),
])
def test_hand_made_cursors_of_the_wrong_shape_are_a_400(fhir: httpx.Client, query: str, key: list[object]) -> None:
    # Values of the wrong type reached the database as parameters and failed there (a 500).
    oo = get(fhir, query + "&_cursor=" + _cursor(key), status=400)
    assert oo["issue"][0]["expression"] == ["_cursor"], oo


@pytest.mark.parametrize("query", ["subject._lastUpdated:foo=2020", "subject._lastUpdated.name=x",
                                   "_lastUpdated.name=x", "_list.name=x", "subject:Patient._lastUpdated:exact=2020"])
def test_lastupdated_and_list_refuse_modifiers_and_chains_everywhere(fhir: httpx.Client, query: str) -> None:
    # At the end of a chain, a modifier or a further chain on _lastUpdated was dropped: the search ran on what
    # was left of the parameter instead of refusing it.
    name, _, value = query.partition("=")
    oo = get(fhir, "/Observation", status=400, params={name: value})
    assert oo["issue"][0]["expression"] == [name], oo
    oo = get(fhir, "/Patient", status=400, params={"_has:Observation:subject:_lastUpdated:foo": "2020"})
    assert oo["issue"][0]["expression"] == ["_has:Observation:subject:_lastUpdated:foo"]


def test_lastupdated_missing_at_the_end_of_a_chain(fhir: httpx.Client) -> None:
    # Every stored resource has a lastUpdated: :missing=false keeps exactly the observations whose subject
    # resolves to a stored resource, :missing=true none.
    with_subject = set(ids(get(fhir, "/Observation", params={"subject._lastUpdated": "gt1900"})))
    assert with_subject
    assert set(ids(get(fhir, "/Observation", params={"subject._lastUpdated:missing": "false"}))) == with_subject
    assert ids(get(fhir, "/Observation", params={"subject._lastUpdated:missing": "true"})) == []
    has = set(ids(get(fhir, "/Patient", params={"_has:Observation:subject:_lastUpdated:missing": "false"})))
    assert has and has == set(ids(get(fhir, "/Patient", params={"_has:Observation:subject:_lastUpdated": "gt1900"})))
