"""Search result handling on both backends: _elements, includes that are cut short, repeated result parameters."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.search.test_search_http import H, get, ids


def outcome_codes(bundle: dict[str, Any]) -> list[str]:
    """message ids of the issues in the bundle's outcome entry."""
    return [c["code"] for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"] for c in i.get("details", {}).get("coding", [])]


def test_elements_keeps_choice_elements_and_whole_top_level_elements(fhir: httpx.Client) -> None:
    # ``value`` / ``value[x]`` name Observation.value[x], stored as valueQuantity: it used to be dropped.
    for el in ("value", "value[x]", "Observation.value"):
        r = get(fhir, f"/Observation?_id=obs1&_elements={el}")["entry"][0]["resource"]
        assert r["valueQuantity"]["value"] == 72, (el, r)
        assert "subject" not in r and "effectiveDateTime" not in r
        assert r["status"] == "final" and "code" in r  # mandatory elements stay
    # A path below the top level keeps its top-level element rather than losing the data asked for.
    r = get(fhir, "/Patient?_id=pat1&_elements=name.family")["entry"][0]["resource"]
    assert r["name"][0]["family"] == "Karimov" and "gender" not in r
    # A type-qualified element is for that type only.
    b = get(fhir, "/Observation?_id=obs1&_elements=Patient.gender,subject&_include=Observation:subject")
    obs, pat = b["entry"][0]["resource"], b["entry"][1]["resource"]
    assert "subject" in obs and "Patient" not in obs and "gender" not in obs
    assert pat["gender"] == "male" and "name" not in pat
    assert all(any(t["code"] == "SUBSETTED" for t in e["resource"]["meta"]["tag"]) for e in b["entry"])
    # Repeated _elements add up like a comma-separated list.
    r = get(fhir, "/Patient?_id=pat1&_elements=gender&_elements=birthDate")["entry"][0]["resource"]
    assert r["gender"] == "male" and r["birthDate"] == "1980-05-06" and "name" not in r


def test_iterate_stopped_by_the_depth_limit_says_so(fhir: httpx.Client) -> None:
    from dhp.interactions.search import MAX_ITERATE

    tag = uuid.uuid4().hex[:8]
    depth = MAX_ITERATE + 3  # the match, the plain include, MAX_ITERATE iterations, and one more beyond
    for i in range(depth):
        org: dict[str, Any] = {"resourceType": "Organization", "id": f"deep-{tag}-{i}", "name": f"deep {i}"}
        if i + 1 < depth:
            org["partOf"] = {"reference": f"Organization/deep-{tag}-{i + 1}"}
        assert fhir.put(f"/Organization/deep-{tag}-{i}", json=org, headers=H).status_code in (200, 201)
    q = "_include:iterate=Organization:partof"
    b = get(fhir, f"/Organization?_id=deep-{tag}-0&{q}")
    assert ids(b, "include") == [f"deep-{tag}-{i}" for i in range(1, depth - 1)]
    assert "search-includes-too-deep" in outcome_codes(b)
    oo = next(e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome")
    assert oo["issue"][0]["expression"] == ["_include:iterate"]
    # One level less reaches the end of the chain: nothing was left out, so no warning.
    b = get(fhir, f"/Organization?_id=deep-{tag}-1&{q}")
    assert ids(b, "include") == [f"deep-{tag}-{i}" for i in range(2, depth)]
    assert outcome_codes(b) == []


def test_include_cap_counts_resources_already_in_the_page(fhir: httpx.Client) -> None:
    """The include lookups were capped at MAX_INCLUDES + 1 rows including resources already on the page
    (here the matches themselves), so hundreds of resources were silently missing with no warning."""
    from dhp.interactions.search import MAX_INCLUDES

    tag = uuid.uuid4().hex[:8]
    n, count = MAX_INCLUDES + 400, 500
    root = f"cap-{tag}-root"
    entries = [{"resource": {"resourceType": "Basic", "id": root, "code": {"text": "root"}},
                "request": {"method": "PUT", "url": f"Basic/{root}"}}]
    for i in range(n):
        rid = f"cap-{tag}-{i:05d}"
        entries.append({"resource": {"resourceType": "Basic", "id": rid, "code": {"text": "leaf"},
                                     "subject": {"reference": f"Basic/{root}"}},
                        "request": {"method": "PUT", "url": f"Basic/{rid}"}})
    r = fhir.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=H)
    assert r.status_code == 200, r.text[:500]
    b = get(fhir, f"/Basic?subject=Basic/{root}&_count={count}&_include=Basic:subject"
                  "&_revinclude:iterate=Basic:subject")
    matched, included = ids(b), ids(b, "include")
    assert len(matched) == count and b["total"] == n
    # Everything fits (root + the other leaves): all of it is there, no warning.
    assert len(included) == 1 + n - count and len(set(included) | set(matched)) == n + 1
    assert outcome_codes(b) == []
    # Too many to include: cut short, and the page says so.
    b = get(fhir, f"/Basic?subject=Basic/{root}&_count=10&_include=Basic:subject"
                  "&_revinclude:iterate=Basic:subject")
    assert len(ids(b, "include")) == MAX_INCLUDES
    assert "search-includes-truncated" in outcome_codes(b)


def test_conflicting_repeats_of_single_valued_result_parameters_are_a_400(fhir: httpx.Client) -> None:
    for query, param in [("_count=1&_count=2", "_count"), ("_sort=family&_sort=-family", "_sort"),
                         ("_total=none&_total=accurate", "_total"), ("_summary=true&_summary=data", "_summary")]:
        oo = get(fhir, f"/Patient?{query}", status=400)
        assert oo["issue"][0]["expression"] == [param], (query, oo)
    # In the query string and the body of a POST search: which one was meant is a guess.
    r = fhir.post("/Patient/_search?_count=1", content="_count=2",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["_count"]
    # The same value twice is no conflict.
    assert len(ids(get(fhir, "/Patient?_count=2&_count=2&_sort=family&_sort=family"))) == 2


def test_malformed_sort_directions_are_a_400(fhir: httpx.Client) -> None:
    for value in ("--family", "-", "family,--_id"):
        oo = get(fhir, "/Patient", status=400, params={"_sort": value})
        assert oo["issue"][0]["expression"] == ["_sort"], (value, oo)


def test_post_search_at_the_base_and_in_compartments(fhir: httpx.Client) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = fhir.post("/_search", content=b"_type=Patient&_id=pat1", headers=form)
    assert r.status_code == 200, r.text
    assert ids(r.json()) == ["pat1"]
    r = fhir.post("/Patient/pat1/Observation/_search", content=b"", headers=form)
    assert r.status_code == 200, r.text
    assert set(ids(r.json())) == set(ids(get(fhir, "/Patient/pat1/Observation"))) == {"obs1", "obs2", "obs6"}
    r = fhir.post("/Patient/pat1/Observation/_search", content=b"code=8480-6", headers=form)
    assert ids(r.json()) == ["obs2"]
    assert fhir.get("/_search").status_code == 405
    r = fhir.post("/Patient/_search", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "x-www-form-urlencoded" in r.text


def test_search_text_that_is_not_utf8_is_a_400(fhir: httpx.Client) -> None:
    # Decoded with replacement characters, such values were searched for as U+FFFD: a silent wrong answer.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"family=\xff\xfe", b"family=%FF%FE"):
        r = fhir.post("/Patient/_search", content=body, headers=form)
        assert r.status_code == 400, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
    r = fhir.get("/Patient?family=%FF")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert fhir.get("/Patient?family=%C3%A9").status_code == 200  # é, well-formed


def test_compartment_star_with_a_type_outside_the_compartment_is_a_400(fhir: httpx.Client) -> None:
    oo = get(fhir, "/Patient/pat1/*", status=400, params={"_type": "Observation,Organization"})
    assert oo["issue"][0]["expression"] == ["_type"] and "Organization" in oo["issue"][0]["diagnostics"]
    get(fhir, "/Patient/pat1/Organization", status=400)
    assert set(ids(get(fhir, "/Patient/pat1/*", params={"_type": "Observation"}))) == {"obs1", "obs2", "obs6"}
