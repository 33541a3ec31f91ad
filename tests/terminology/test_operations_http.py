"""The terminology operations over real HTTP on both backends: GET and POST, type and instance level."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from dhp.terminology.text import words
from tests.terminology.conftest import ADDRESS_USE, CS, VS

POSITION = CS + "position-and-profession-cs"


def params(*items: tuple[str, str, Any]) -> bytes:
    return orjson.dumps({"resourceType": "Parameters",
                         "parameter": [{"name": n, k: v} for n, k, v in items]})


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def outcome(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    if code:
        assert body["issue"][0]["code"] == code
    return body


def value(body: dict[str, Any], name: str) -> Any:
    for p in body["parameter"]:
        if p["name"] == name:
            return next((v for k, v in p.items() if k.startswith("value")), p.get("part") or p.get("resource"))
    return None


def contains(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["expansion"].get("contains", [])


def _designation(c: dict[str, Any], lang: str) -> str:
    return next(d["value"] for d in c["designation"] if d.get("language") == lang)


# ---------------------------------------------------------------- $expand


def test_expand_get_type_level_russian_page(client: httpx.Client, package_cs: Any) -> None:
    states = package_cs(CS + "states-cs")["concept"]
    body = ok(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "displayLanguage": "ru",
                                                      "count": 5, "offset": 2}))
    assert body["resourceType"] == "ValueSet" and body["url"] == VS + "state-vs"
    assert body["expansion"]["total"] == len(states)
    assert [(c["code"], c["display"]) for c in contains(body)] == \
        [(c["code"], _designation(c, "ru")) for c in states[2:7]]
    echoed = {p["name"] for p in body["expansion"]["parameter"]}
    assert {"displayLanguage", "count", "offset", "used-codesystem"} <= echoed


def test_expand_instance_level_type_ahead_with_accept_language(client: httpx.Client, package_cs: Any) -> None:
    concepts = package_cs(CS + "mahalla-cs")["concept"]
    expected = [c for c in concepts if any(w.startswith("ilgor") for w in words(c["display"]))]
    for spelling in ("ilgʻor", "ilg'or"):
        r = client.get("/ValueSet/mahalla-vs/$expand", params={"filter": spelling, "count": 20},
                       headers={"Accept-Language": "en;q=0.9, ru"})
        body = ok(r)
        assert body["expansion"]["total"] == len(expected)
        assert [(c["code"], c["display"]) for c in contains(body)] == \
            [(c["code"], _designation(c, "ru")) for c in expected[:20]]


@pytest.mark.parametrize(("lang", "query"), [("uz", "shifokor"), ("ru", "врач"), ("en", "doctor")])
def test_expand_post_type_ahead_three_languages(client: httpx.Client, package_cs: Any, lang: str,
                                                query: str) -> None:
    concepts = package_cs(POSITION)["concept"]
    expected = [c for c in concepts
                if any(w.startswith(query) for t in (c["display"], *(d["value"] for d in c["designation"]))
                       for w in words(t))]
    body = ok(client.post("/ValueSet/$expand", content=params(
        ("url", "valueUri", VS + "position-and-profession-vs"), ("filter", "valueString", query),
        ("count", "valueInteger", 20), ("displayLanguage", "valueCode", lang))))
    assert body["expansion"]["total"] == len(expected)
    want = [c["display"] if lang == "uz" else _designation(c, lang) for c in expected[:20]]
    assert [c["display"] for c in contains(body)] == want


def test_expand_post_inline_value_set_with_filter_and_designations(client: httpx.Client, package_cs: Any) -> None:
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    vs = {"resourceType": "ValueSet", "status": "active", "compose": {"include": [{
        "system": POSITION, "filter": [{"property": "concept", "op": "child-of", "value": "1111"}]}]}}
    body = ok(client.post("/ValueSet/$expand", content=orjson.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "valueSet", "resource": vs}, {"name": "includeDesignations", "valueBoolean": True},
        {"name": "property", "valueString": "parent"}]})))
    assert [c["code"] for c in contains(body)] == [c for c in codes if c.startswith("1111.")]
    first = contains(body)[0]
    assert {d["language"] for d in first["designation"]} == {"ru", "en"}
    assert first["property"] == [{"code": "parent", "valueCode": "1111"}]


def test_expand_supplement_display_of_address_use(client: httpx.Client, package_cs: Any) -> None:
    home = next(c for c in package_cs(CS + "address-use-cs")["concept"] if c["code"] == "home")
    body = ok(client.get("/ValueSet/address-use-vs/$expand", params={"displayLanguage": "uz"}))
    assert {c["code"]: c["display"] for c in contains(body)}["home"] == _designation(home, "uz")


def test_expand_errors(client: httpx.Client) -> None:
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "nope-vs"}), 404, "not-found")
    outcome(client.get("/ValueSet/no-such-id/$expand"), 404, "not-found")
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "position-and-profession-vs"}), 422,
            "too-costly")
    page = ok(client.get("/ValueSet/$expand", params={"url": VS + "position-and-profession-vs", "count": 3}))
    assert page["expansion"]["total"] == 12_551 and len(contains(page)) == 3
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "count": "many"}), 400)
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "offset": "-1"}), 400)
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "filtr": "x"}), 400)
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "date": "yesterday"}), 400)
    outcome(client.get("/ValueSet/$expand"), 400)
    outcome(client.get("/ValueSet/state-vs/$expand", params={"url": VS + "state-vs"}), 400)


# ---------------------------------------------------------------- $lookup


def test_lookup_get_post_and_instance(client: httpx.Client, package_cs: Any) -> None:
    tashkent = next(c for c in package_cs(CS + "states-cs")["concept"] if c["code"] == "1727")
    got = ok(client.get("/CodeSystem/$lookup", params={"system": CS + "states-cs", "code": "1727",
                                                       "displayLanguage": "ru"}))
    assert value(got, "display") == _designation(tashkent, "ru")
    posted = ok(client.post("/CodeSystem/$lookup", content=params(
        ("coding", "valueCoding", {"system": CS + "states-cs", "code": "1727"}),
        ("displayLanguage", "valueCode", "en"))))
    assert value(posted, "display") == _designation(tashkent, "en")
    inst = ok(client.get("/CodeSystem/states-cs/$lookup", params={"code": "1727"}))
    assert value(inst, "display") == tashkent["display"]
    home = ok(client.get("/CodeSystem/$lookup", params={"system": ADDRESS_USE, "code": "home"},
                         headers={"Accept-Language": "uz"}))
    sup = next(c for c in package_cs(CS + "address-use-cs")["concept"] if c["code"] == "home")
    assert value(home, "display") == _designation(sup, "uz")


def test_lookup_children_of_a_position_group(client: httpx.Client, package_cs: Any) -> None:
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    body = ok(client.get("/CodeSystem/$lookup", params=[("system", POSITION), ("code", "1111"),
                                                        ("property", "child")]))
    children = [next(x["valueCode"] for x in p["part"] if x["name"] == "value")
                for p in body["parameter"] if p["name"] == "property"]
    assert children == [c for c in codes if c.startswith("1111.")]


def test_lookup_errors(client: httpx.Client) -> None:
    outcome(client.get("/CodeSystem/$lookup", params={"system": "http://loinc.org", "code": "8867-4"}), 404)
    outcome(client.get("/CodeSystem/$lookup", params={"system": CS + "states-cs", "code": "0000"}), 404)
    outcome(client.get("/CodeSystem/$lookup", params={"code": "1727"}), 400)
    outcome(client.get("/CodeSystem/$lookup", params={"system": CS + "states-cs"}), 400)


# ---------------------------------------------------------------- $validate-code


def test_validate_code_value_set_get_post_instance(client: httpx.Client, package_cs: Any) -> None:
    tashkent = next(c for c in package_cs(CS + "states-cs")["concept"] if c["code"] == "1727")
    good = ok(client.get("/ValueSet/$validate-code", params={"url": VS + "state-vs", "system": CS + "states-cs",
                                                             "code": "1727", "displayLanguage": "ru"}))
    assert value(good, "result") is True and value(good, "display") == _designation(tashkent, "ru")
    bad = ok(client.get("/ValueSet/state-vs/$validate-code", params={"system": CS + "states-cs",
                                                                     "code": "9999"}))
    assert value(bad, "result") is False and "9999" in value(bad, "message")
    assert value(bad, "issues")["issue"][0]["severity"] == "error"
    cc = {"coding": [{"system": "http://loinc.org", "code": "8867-4"},
                     {"system": CS + "states-cs", "code": "1727", "display": _designation(tashkent, "en")}]}
    posted = ok(client.post("/ValueSet/$validate-code", content=orjson.dumps({
        "resourceType": "Parameters", "parameter": [{"name": "url", "valueUri": VS + "state-vs"},
                                                    {"name": "codeableConcept", "valueCodeableConcept": cc}]})))
    assert value(posted, "result") is True and value(posted, "code") == "1727"
    wrong = ok(client.post("/ValueSet/$validate-code", content=params(
        ("url", "valueUri", VS + "state-vs"),
        ("coding", "valueCoding", {"system": CS + "states-cs", "code": "1727", "display": "Buxoro"}))))
    assert value(wrong, "result") is False and "Wrong display" in value(wrong, "message")


def test_validate_code_code_system_unknown_system_and_ucum(client: httpx.Client) -> None:
    good = ok(client.get("/CodeSystem/$validate-code", params={"url": CS + "regions-cs", "code": "1703202"}))
    assert value(good, "result") is True
    inst = ok(client.get("/CodeSystem/regions-cs/$validate-code", params={"code": "nope"}))
    assert value(inst, "result") is False
    loinc = ok(client.get("/CodeSystem/$validate-code", params={"url": "http://loinc.org", "code": "8867-4"}))
    assert value(loinc, "result") is False
    issue = value(loinc, "issues")["issue"][0]
    assert issue["severity"] == "warning" and "not known" in issue["diagnostics"]
    unit = ok(client.get("/CodeSystem/$validate-code", params={"url": "http://unitsofmeasure.org",
                                                               "code": "mm[Hg]"}))
    assert value(unit, "result") is True
    not_unit = ok(client.post("/CodeSystem/$validate-code", content=params(
        ("url", "valueUri", "http://unitsofmeasure.org"), ("code", "valueCode", "mm[Hgg]"))))
    assert value(not_unit, "result") is False


def test_validate_code_errors(client: httpx.Client) -> None:
    outcome(client.get("/ValueSet/$validate-code", params={"url": VS + "nope", "code": "x", "system": "y"}), 404)
    outcome(client.get("/ValueSet/$validate-code", params={"code": "1727"}), 400)
    outcome(client.get("/ValueSet/$validate-code", params={"url": VS + "state-vs"}), 400)
    outcome(client.get("/ValueSet/$validate-code", params={"url": VS + "state-vs", "code": "1727",
                                                           "abstract": "maybe"}), 400)


# ---------------------------------------------------------------- $subsumes


def test_subsumes_get_post_instance(client: httpx.Client) -> None:
    get = ok(client.get("/CodeSystem/$subsumes", params={"system": POSITION, "codeA": "1111", "codeB": "1111.2"}))
    assert value(get, "outcome") == "subsumes"
    post = ok(client.post("/CodeSystem/$subsumes", content=params(
        ("codingA", "valueCoding", {"system": POSITION, "code": "1111.2"}),
        ("codingB", "valueCoding", {"system": POSITION, "code": "1111"}))))
    assert value(post, "outcome") == "subsumed-by"
    inst = ok(client.get("/CodeSystem/position-and-profession-cs/$subsumes",
                         params={"codeA": "1111.1", "codeB": "1112"}))
    assert value(inst, "outcome") == "not-subsumed"
    outcome(client.get("/CodeSystem/$subsumes", params={"system": POSITION, "codeA": "1111", "codeB": "x"}), 404)
    outcome(client.get("/CodeSystem/$subsumes", params={"codeA": "1111", "codeB": "1112"}), 400)


# ---------------------------------------------------------------- REST-written definitions and $translate


def _post(client: httpx.Client, res: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/{res['resourceType']}", content=orjson.dumps(res))
    assert r.status_code == 201, r.text
    return r.json()


def test_code_system_and_value_set_created_via_rest_take_effect_at_once(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    cs = {"resourceType": "CodeSystem", "url": f"https://dhp.uz/fhir/test/CodeSystem/kinds-{tag}",
          "status": "active", "content": "complete", "language": "uz", "hierarchyMeaning": "is-a",
          "concept": [{"code": "poly", "display": "Poliklinika",
                       "designation": [{"language": "ru", "value": "Поликлиника"}],
                       "concept": [{"code": "poly-child", "display": "Bolalar poliklinikasi",
                                    "designation": [{"language": "ru", "value": "Детская поликлиника"}]}]}]}
    vs = {"resourceType": "ValueSet", "url": f"https://dhp.uz/fhir/test/ValueSet/kinds-{tag}", "status": "active",
          "compose": {"include": [{"system": cs["url"]}]}}
    stored = _post(client, cs)
    stored_vs = _post(client, vs)
    body = ok(client.get("/ValueSet/$expand", params={"url": vs["url"], "displayLanguage": "ru"}))
    assert [(c["code"], c["display"]) for c in contains(body)] == \
        [("poly", "Поликлиника"), ("poly-child", "Детская поликлиника")]
    inst = ok(client.get(f"/ValueSet/{stored_vs['id']}/$expand", params={"filter": "bolalar"}))
    assert [c["code"] for c in contains(inst)] == ["poly-child"]
    sub = ok(client.get(f"/CodeSystem/{stored['id']}/$subsumes", params={"codeA": "poly", "codeB": "poly-child"}))
    assert value(sub, "outcome") == "subsumes"
    # An update is seen by the next call.
    stored["concept"].append({"code": "hosp", "display": "Shifoxona"})
    r = client.put(f"/CodeSystem/{stored['id']}", content=orjson.dumps(stored),
                   headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    check = ok(client.get("/ValueSet/$validate-code", params={"url": vs["url"], "system": cs["url"],
                                                              "code": "hosp"}))
    assert value(check, "result") is True
    assert client.delete(f"/CodeSystem/{stored['id']}").status_code in (200, 204)
    gone = ok(client.get("/CodeSystem/$validate-code", params={"url": cs["url"], "code": "hosp"}))
    assert value(gone, "result") is False


def test_translate_icd10_to_local_code_forward_and_reverse(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    icd = "http://hl7.org/fhir/sid/icd-10"
    local = CS + "cancer-types-cs"
    cm = {"resourceType": "ConceptMap", "url": f"https://dhp.uz/fhir/test/ConceptMap/icd10-{tag}",
          "status": "active", "group": [{"source": icd, "target": local, "element": [
              {"code": "C50.9", "target": [{"code": "cancr0005.00021", "relationship": "related-to"}]}]}]}
    stored = _post(client, cm)
    fwd = ok(client.get("/ConceptMap/$translate", params={"url": cm["url"], "system": icd,
                                                          "sourceCode": "C50.9"}))
    assert value(fwd, "result") is True
    match = value(fwd, "match")
    assert next(p["valueCoding"] for p in match if p["name"] == "concept") == \
        {"system": local, "code": "cancr0005.00021"}
    assert next(p["valueUri"] for p in match if p["name"] == "originMap") == cm["url"]
    rev = ok(client.post(f"/ConceptMap/{stored['id']}/$translate", content=params(
        ("targetCoding", "valueCoding", {"system": local, "code": "cancr0005.00021"}))))
    assert value(rev, "result") is True
    assert next(p["valueCoding"]["code"] for p in value(rev, "match") if p["name"] == "concept") == "C50.9"
    # Without a url every map from that system is searched.
    any_map = ok(client.post("/ConceptMap/$translate", content=params(
        ("sourceCoding", "valueCoding", {"system": icd, "code": "C50.9"}), ("targetSystem", "valueUri", local))))
    assert value(any_map, "result") is True
    none = ok(client.get("/ConceptMap/$translate", params={"url": cm["url"], "system": icd, "sourceCode": "J18"}))
    assert value(none, "result") is False
    outcome(client.get("/ConceptMap/$translate", params={"url": cm["url"] + "-nope", "system": icd,
                                                         "sourceCode": "C50.9"}), 404)
    outcome(client.get("/ConceptMap/$translate", params={"url": cm["url"], "sourceCode": "C50.9"}), 400)


def test_remaining_parameters_over_http(client: httpx.Client, package_cs: Any) -> None:
    act = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    # abstract=false rejects a notSelectable code; omitted, it is allowed.
    strict = ok(client.get("/CodeSystem/$validate-code", params={"url": act, "code": "_ActAccountCode",
                                                                 "abstract": "false"}))
    assert value(strict, "result") is False
    assert value(ok(client.get("/CodeSystem/$validate-code", params={"url": act, "code": "_ActAccountCode"})),
                 "result") is True
    # activeOnly drops retired codes from an expansion and from validation.
    vs = {"resourceType": "ValueSet", "status": "active", "compose": {"include": [{"system": act}]}}
    everything = ok(client.post("/ValueSet/$expand", content=orjson.dumps({"resourceType": "Parameters",
                    "parameter": [{"name": "valueSet", "resource": vs}]})))
    retired = [c["code"] for c in contains(everything) if c.get("inactive")]
    assert retired
    active = ok(client.post("/ValueSet/$expand", content=orjson.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "valueSet", "resource": vs}, {"name": "activeOnly", "valueBoolean": True}]})))
    assert active["expansion"]["total"] == everything["expansion"]["total"] - len(retired)
    # excludeNested=false nests a position group's members under it.
    nested = ok(client.post("/ValueSet/$expand", content=orjson.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "valueSet", "resource": {"resourceType": "ValueSet", "status": "active", "compose": {"include": [
            {"system": POSITION, "filter": [{"property": "concept", "op": "is-a", "value": "1111"}]}]}}},
        {"name": "excludeNested", "valueBoolean": False}]})))
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    assert [c["code"] for c in contains(nested)] == ["1111"]
    assert [c["code"] for c in contains(nested)[0]["contains"]] == [c for c in codes if c.startswith("1111.")]
    # designation picks which designations come back.
    ru = ok(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "designation": "ru", "count": 2}))
    assert all([d["language"] for d in c["designation"]] == ["ru"] for c in contains(ru))
    # date is accepted (current definitions are used); valueSetVersion must exist.
    assert ok(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "date": "2025-01-01",
                                                      "count": 1}))["expansion"]["total"] == 14
    outcome(client.get("/ValueSet/$expand", params={"url": VS + "state-vs", "valueSetVersion": "9.9.9"}), 404)
    pinned = ok(client.get("/ValueSet/$expand", params={"url": "http://hl7.org/fhir/ValueSet/address-use",
                                                         "valueSetVersion": "5.0.0"}))
    assert pinned["version"] == "5.0.0"
    assert [c["code"] for c in contains(pinned)] == [c["code"] for c in package_cs(ADDRESS_USE)["concept"]]
    # systemVersion / version: a version not loaded is reported, the loaded one is used.
    v = ok(client.get("/ValueSet/$validate-code", params={"url": "http://hl7.org/fhir/ValueSet/address-use",
                                                          "system": ADDRESS_USE, "code": "home",
                                                          "systemVersion": "4.0.1"}))
    assert value(v, "result") is True and "4.0.1" in value(v, "message")
    lk = ok(client.get("/CodeSystem/$lookup", params={"system": ADDRESS_USE, "code": "home", "version": "5.0.0"}))
    assert value(lk, "version") == "5.0.0"
    # useSupplement must name a known supplement.
    outcome(client.get("/CodeSystem/$lookup", params={"system": ADDRESS_USE, "code": "home",
                                                      "useSupplement": "https://example.org/nope"}), 404)
    assert value(ok(client.get("/CodeSystem/$lookup", params={
        "system": ADDRESS_USE, "code": "home", "displayLanguage": "ru",
        "useSupplement": CS + "address-use-cs"})), "display") == _designation(
        next(c for c in package_cs(CS + "address-use-cs")["concept"] if c["code"] == "home"), "ru")
