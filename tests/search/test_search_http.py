"""Search over real HTTP on SQLite and PostgreSQL: every parameter type, modifier, prefix and result parameter."""

from __future__ import annotations

import asyncio
import time
from datetime import date
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.search.conftest import PINFL

H = {"Content-Type": "application/fhir+json"}


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def get(c: httpx.Client, url: str, status: int = 200, **kw: Any) -> dict[str, Any]:
    r = c.get(url, **kw)
    assert r.status_code == status, f"{url}: {r.status_code} {r.text[:500]}"
    return r.json()


CASES: list[tuple[str, set[str]]] = [
    # string: prefix, case/accent/apostrophe-insensitive, Latin and Cyrillic, :exact, :contains, OR and AND
    ("Patient?name=kari", {"pat1"}),
    ("Patient?name=KARIMOV", {"pat1"}),
    ("Patient?name=каримов", {"pat1"}),
    ("Patient?name=алишер", set()),
    ("Patient?name:contains=алишер", {"pat1"}),
    ("Patient?family=to'xtayeva", {"pat2"}),
    ("Patient?given=o‘g‘iloy", {"pat2"}),
    ("Patient?name=jose", {"pat3"}),
    ("Patient?name:exact=Karimov", {"pat1"}),
    ("Patient?name:exact=karimov", set()),
    ("Patient?name:contains=rim", {"pat1"}),
    ("Patient?family=kar,nun", {"pat1", "pat3"}),
    ("Patient?name=kar&name=ali", {"pat1"}),
    ("Patient?name=kar&name=dil", set()),
    ("Patient?address-city=17150085", {"pat1"}),
    ("Patient?address=mustaqillik", {"pat1"}),
    ("Patient?address-state=1727", {"pat1", "pat2"}),
    ("Organization?name=toshkent", {"org1"}),
    ("Patient?name:missing=true", set()),
    # token
    (f"Patient?identifier={PINFL}|31234567890123", {"pat1"}),
    ("Patient?identifier=31234567890123", {"pat1"}),
    (f"Patient?identifier={PINFL}|", {"pat1", "pat2"}),
    ("Patient?identifier=|31234567890123", set()),
    ("Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|PPN|AB1234567", {"pat2"}),
    ("Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|NI|AB1234567", set()),
    ("Patient?gender=male", {"pat1", "pat3"}),
    ("Patient?gender:not=male", {"pat2"}),
    ("Patient?gender:not=male,female", set()),
    ("Patient?active=true", {"pat1"}),
    ("Patient?active:missing=true", {"pat3"}),
    ("Patient?active:missing=false", {"pat1", "pat2"}),
    ("Patient?telecom=%2B998901234567", {"pat1"}),
    ("Patient?_tag=http://dhp.test/tag|vip", {"pat1"}),
    ("Patient?_id=pat1,pat3", {"pat1", "pat3"}),
    ("Observation?code=http://loinc.org|8867-4", {"obs1", "obs3"}),
    ("Observation?code=http://snomed.info/sct|8867-4", set()),
    ("Observation?code=8480-6,8867-4", {"obs1", "obs2", "obs3"}),
    ("Observation?code:text=heart", {"obs1", "obs3"}),
    ("Observation?code:text=tamaki", {"obs5"}),
    ("Observation?code:text=chekish", {"obs5"}),
    ("Observation?code:code-text=8867", {"obs1", "obs3"}),
    ("Observation?status:not=final", {"obs3"}),
    ("Observation?value-concept=http://snomed.info/sct|8517006", {"obs5"}),
    ("Condition?clinical-status=active", {"cond1"}),
    # reference
    ("Observation?subject=Patient/pat1", {"obs1", "obs2", "obs6"}),
    ("Observation?subject=pat1", {"obs1", "obs2", "obs6"}),
    ("Observation?patient=pat1", {"obs1", "obs2", "obs6"}),
    ("Observation?subject:Patient=pat2", {"obs3", "obs4"}),
    ("Observation?subject:Group=pat2", set()),
    ("Observation?encounter=Encounter/enc1", {"obs1"}),
    ("Observation?subject=Patient/pat1,Patient/pat3", {"obs1", "obs2", "obs5", "obs6"}),
    ("Organization?partof=org1", {"org2"}),
    ("Patient?general-practitioner:missing=false", {"pat1"}),
    ("Patient?general-practitioner:missing=true", {"pat2", "pat3"}),
    ("Encounter?participant=Practitioner/doc1", {"enc1"}),
    (f"Observation?performer:identifier={PINFL}|30101010000011", {"obs2"}),
    ("Observation?performer:identifier=30101010000011", {"obs2"}),
    ("Patient?_profile=https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient", {"pat1"}),
    ("Condition?evidence-detail=Observation/obs2", {"cond1"}),
    ("Patient?_profile:below=https://dhp.uz/fhir/core/StructureDefinition/", {"pat1"}),
    ("Patient?_profile:below=https://dhp.uz/fhir/other/", set()),
    ("Patient?_source=http://mis.dhp.test/1", {"pat2"}),
    ("Patient?_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R", {"pat3"}),
    ("Patient?_security:not=R", {"pat1", "pat2"}),
    # date: a date is a range at its precision
    ("Patient?birthdate=1980", {"pat1", "pat3"}),
    ("Patient?birthdate=1980-05", {"pat1"}),
    ("Patient?birthdate=eq1980-05-06", {"pat1"}),
    ("Patient?birthdate=ne1980", {"pat2"}),
    ("Patient?birthdate=ge1990", {"pat2"}),
    ("Patient?birthdate=gt1980-06", {"pat2", "pat3"}),
    ("Patient?birthdate=lt1980-06", {"pat1", "pat3"}),
    ("Patient?birthdate=le1980-05-06", {"pat1", "pat3"}),
    ("Patient?birthdate=sa1980-12-31", {"pat2"}),
    ("Patient?birthdate=eb1990", {"pat1", "pat3"}),
    ("Patient?birthdate=ap1980-05-06", {"pat1", "pat3"}),
    ("Patient?birthdate=ge1980&birthdate=lt1981", {"pat1", "pat3"}),
    # A year-precision birthDate spans the whole year: at the far edge of the width bound on the index scan.
    ("Patient?birthdate=ge1980-12-30", {"pat2", "pat3"}),
    ("Patient?birthdate=gt1980-12-30", {"pat2", "pat3"}),
    ("Patient?birthdate=ge1980-12-31", {"pat2"}),  # nothing of 1980 lies above its last day
    ("Patient?birthdate=ge1980-12-30&birthdate=lt1981-01-01", {"pat3"}),
    # ranges that end past 9999-12-31 or start before year 1 are ranges like any (datetime overflows there)
    ("Patient?birthdate=9999-12", set()),
    ("Patient?birthdate=le9999-12-31T23:00:00-05:00", {"pat1", "pat2", "pat3"}),
    ("Patient?birthdate=gt0001-01-01T00:00:00%2B01:00", {"pat1", "pat2", "pat3"}),
    ("Patient?death-date=2024-03", {"pat2"}),
    ("Observation?date=2024-01-01", {"obs1"}),
    ("Observation?date=2023-06-01T07:30:00Z", {"obs3"}),
    ("Observation?date=2023-06-01T12:30:00%2B05:00", {"obs3"}),
    ("Observation?date=ge2024-05-01T10:02:00Z", {"obs4"}),
    ("Observation?date=2024-05-01", {"obs4"}),
    ("Observation?date=2022", {"obs5"}),
    ("Encounter?date=2024-01-01", {"enc1"}),
    ("Encounter?date=ge2024-06-01", {"enc2"}),
    ("Encounter?date=2024-06", set()),
    ("Patient?_lastUpdated=gt2000-01-01", {"pat1", "pat2", "pat3"}),
    ("Patient?_lastUpdated=lt2000-01-01", set()),
    # number
    ("RiskAssessment?probability=0.35", {"risk1"}),
    ("RiskAssessment?probability=gt0.5", {"risk2"}),
    ("RiskAssessment?probability=100", {"risk2"}),
    ("RiskAssessment?probability=1e2", {"risk2"}),
    ("RiskAssessment?probability=ap0.34", {"risk1"}),
    ("RiskAssessment?probability=le0.35", {"risk1"}),
    ("RiskAssessment?probability=ne0.35", {"risk2"}),
    # quantity: value precision, system|code, unit
    ("Observation?value-quantity=72", {"obs1"}),
    ("Observation?value-quantity=gt80", {"obs2", "obs3"}),
    ("Observation?value-quantity=120.5|http://unitsofmeasure.org|mm[Hg]", {"obs2"}),
    ("Observation?value-quantity=120|http://unitsofmeasure.org|mm[Hg]", set()),
    ("Observation?value-quantity=le100||/min", {"obs1", "obs3"}),
    ("Observation?value-quantity=le100||beats/minute", {"obs1", "obs3"}),
    ("Observation?value-quantity=lt100|http://unitsofmeasure.org|mm[Hg]", set()),
    ("Observation?component-value-quantity=gt125", {"obs4"}),
    ("Observation?combo-value-quantity=gt80", {"obs2", "obs3", "obs4"}),
    ("Observation?combo-value-quantity=lt80", {"obs1"}),
    ("Observation?combo-value-quantity=85||mm[Hg]", {"obs4"}),
    ("Observation?combo-value-quantity:missing=true", {"obs5", "obs6"}),
    # uri
    ("Questionnaire?url=http://dhp.test/fhir/Questionnaire/form-096", {"q1"}),
    ("Questionnaire?url:below=http://dhp.test/fhir/Questionnaire/form-096", {"q1", "q2"}),
    ("Questionnaire?url:above=http://dhp.test/fhir/Questionnaire/form-096/birth/v2", {"q1", "q2"}),
    ("Questionnaire?url:above=http://dhp.test/fhir/Questionnaire/form-096", {"q1"}),
    # composite
    ("Observation?code-value-quantity=http://loinc.org|8867-4$gt80", {"obs3"}),
    ("Observation?code-value-quantity=8867-4$72", {"obs1"}),
    ("Observation?component-code-value-quantity=8480-6$gt125", {"obs4"}),
    ("Observation?combo-code-value-quantity=8480-6$lt125", {"obs2"}),
    ("Observation?combo-code-value-quantity=8480-6$gt125", {"obs4"}),
    # a quantity component's ||unit matches the code or the human unit, as value-quantity does
    ("Observation?code-value-quantity=8867-4$le100||/min", {"obs1", "obs3"}),
    ("Observation?code-value-quantity=8867-4$le100||beats/minute", {"obs1", "obs3"}),
    ("Observation?code-value-quantity=8867-4$le100|http://unitsofmeasure.org|beats/minute", set()),
    ("Observation?component-code-value-quantity=8480-6$130||mmHg", {"obs4"}),
    ("Observation?code-value-string=72166-2$never", {"obs6"}),
    # special
    ("Location?near=41.3|69.28|5|km", {"loc1"}),
    ("Location?near=41.3|69.28|300|km", {"loc1", "loc2"}),
    ("Location?near=41.3|69.28|2000|m", {"loc1"}),
    # chains (any depth, with and without a type)
    ("Observation?subject.name=karimov", {"obs1", "obs2", "obs6"}),
    (f"Observation?subject:Patient.identifier={PINFL}|41234567890123", {"obs3", "obs4"}),
    ("Observation?patient.organization.name=samarqand", {"obs3", "obs4"}),
    ("Observation?patient.organization.partof.name=toshkent", {"obs3", "obs4"}),
    ("Observation?encounter.service-provider.identifier=200100100", {"obs1"}),
    ("Observation?subject.birthdate=lt1981", {"obs1", "obs2", "obs5", "obs6"}),
    # reverse chains, nested
    ("Patient?_has:Observation:subject:code=8867-4", {"pat1", "pat2"}),
    ("Patient?_has:Observation:patient:_has:Condition:evidence-detail:code=I10", {"pat1"}),
    ("Practitioner?_has:Encounter:participant:status=completed", {"doc1"}),
    ("Patient?_has:Observation:subject:code=8867-4&gender=female", {"pat2"}),
    # parameters that read other parameters' rows (dhp.search.shared): unions, resolve() filters, name parts
    ("Observation?combo-code=8480-6", {"obs2", "obs4"}),
    ("Observation?combo-code=http://loinc.org|85354-9", {"obs4"}),
    ("Observation?combo-code:text=heart", {"obs1", "obs3"}),
    ("Observation?combo-code:not=8867-4", {"obs2", "obs4", "obs5", "obs6"}),
    ("Patient?phonetic=karimov", {"pat1"}),
    ("Patient?phonetic=каримов", {"pat1"}),
    ("Patient?name=alisher", {"pat1"}),
    ("Patient?name:exact=Alisher", {"pat1"}),
    ("Patient?name:contains=iloy", {"pat2"}),
    ("Patient?address=17150086", {"pat2"}),
    ("Patient?address=1727220", {"pat1", "pat2"}),
    ("Patient?address:exact=UZ", {"pat1"}),
    ("Patient?address:missing=true", {"pat3"}),
    ("Condition?patient:missing=false", {"cond1"}),
    ("Observation?patient:missing=true", set()),
    ("Encounter?practitioner=doc1", {"enc1"}),
    ("Encounter?practitioner:missing=true", {"enc2"}),
    ("Encounter?patient.gender=female", {"enc2"}),
    ("?_type=Observation,Encounter&patient=pat2", {"obs3", "obs4", "enc2"}),
    ("?_type=Observation,Condition&patient:missing=false&_id=obs1,cond1,enc1", {"obs1", "cond1"}),
    ("Practitioner?_has:Encounter:practitioner:status=completed", {"doc1"}),
    # _list, embedded document resources
    ("Patient?_list=list1", {"pat1", "pat3"}),
    ("Bundle?composition.category=birth", {"doc-bundle"}),
    ("Bundle?type=document&composition.type=http://loinc.org|11503-0", {"doc-bundle"}),
    ("Bundle?composition.subject:Patient.name=to'xta", {"doc-bundle"}),
    ("Bundle?composition.category=death", set()),
]


@pytest.mark.parametrize(("query", "expected"), CASES, ids=[c[0] for c in CASES])
def test_search_matches(fhir: httpx.Client, query: str, expected: set[str]) -> None:
    b = get(fhir, "/" + query)
    assert b["resourceType"] == "Bundle" and b["type"] == "searchset"
    assert set(ids(b)) == expected
    assert b["total"] == len(expected)
    for e in b.get("entry", []):
        if e["search"]["mode"] == "match":
            assert e["fullUrl"].endswith(f"/{e['resource']['resourceType']}/{e['resource']['id']}")


ERRORS = [
    ("Patient?birthdate=xx", "birthdate"),
    ("Patient?birthdate=zz1980", "birthdate"),
    ("Patient?birthdate=1980-13", "birthdate"),
    ("RiskAssessment?probability=abc", "probability"),
    ("Patient?name:foo=x", "name:foo"),
    ("Patient?gender:exact=male", "gender:exact"),
    ("Observation?subject.foo=bar", "subject.foo"),
    ("Observation?code.name=x", "code.name"),
    ("Observation?subject:Foo.name=x", "subject:Foo.name"),
    ("Patient?_has:Observation:code:code=1", "_has:Observation:code:code"),
    ("Patient?_has:Nope:subject:code=1", "_has:Nope:subject:code"),
    ("Patient?active:missing=maybe", "active:missing"),
    ("Patient?_count=many", "_count"),
    ("Patient?_sort=nope", "_sort"),
    ("Patient?_total=some", "_total"),
    ("Patient?_include=Patient:name", "_include"),
    ("Patient?identifier:of-type=a|b", "identifier:of-type"),
    ("Observation?code-value-quantity=8867-4", "code-value-quantity"),
    ("Location?near=north", "near"),
    ("?name=karimov", "name"),
    ("Patient?_cursor=garbage", "_cursor"),
]


@pytest.mark.parametrize(("query", "param"), ERRORS, ids=[e[0] for e in ERRORS])
def test_malformed_is_400_naming_the_parameter(fhir: httpx.Client, query: str, param: str) -> None:
    oo = get(fhir, "/" + query, status=400)
    assert oo["resourceType"] == "OperationOutcome"
    issue = oo["issue"][0]
    assert issue["severity"] == "error"
    assert param in issue.get("expression", []) or param in issue["diagnostics"], issue


def test_unknown_parameter_is_reported_or_strict_400(fhir: httpx.Client) -> None:
    b = get(fhir, "/Patient?nonsense=1&gender=female")
    assert ids(b) == ["pat2"]
    outcomes = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and "nonsense" in outcomes[0]["issue"][0]["diagnostics"]
    assert not any("nonsense" in link["url"] for link in b["link"])
    oo = get(fhir, "/Patient?nonsense=1", status=400, headers={"Prefer": "handling=strict"})
    assert "nonsense" in oo["issue"][0]["diagnostics"]
    # a parameter the spec defines but this server cannot evaluate: reported, never silently dropped
    b = get(fhir, "/Patient?_text=karimov&gender=female")
    assert ids(b) == ["pat2"]
    assert any(e["search"]["mode"] == "outcome" for e in b["entry"])
    get(fhir, "/Patient?_text=karimov", status=400, headers={"Prefer": "handling=strict"})


def test_age_is_whole_years_from_the_birth_date_to_today(fhir: httpx.Client) -> None:
    """The extensions package's Patient ``age`` is a number over ``Patient.birthDate``: no number can be
    indexed for it (it used to find nothing, silently). It is searched as whole years from the birth date to
    today, deceased patients left out as its definition says; pat1 was born 1980-05-06, pat2 is deceased."""
    today = date.today()  # the server's day: it runs in this process's time zone
    a1 = today.year - 1980 - ((today.month, today.day) < (5, 6))

    def found(query: str) -> set[str]:
        return set(ids(get(fhir, "/Patient?" + query)))

    assert found(f"age={a1}") == {"pat1"}
    assert "pat1" in found(f"age=ge{a1}") and "pat1" in found(f"age=le{a1}") and "pat1" in found(f"age=ap{a1}")
    for query in (f"age=gt{a1}", f"age=lt{a1}", f"age=ne{a1}", f"age={a1 + 1}", f"age={a1 - 1}"):
        assert "pat1" not in found(query), query
    assert "pat1" in found(f"age={a1 - 1},{a1}")
    assert "pat2" not in found("age=ge0") and "pat1" in found("age=ge0")
    obs = get(fhir, f"/Observation?subject:Patient.age={a1}")
    assert obs["entry"] and {e["resource"]["subject"]["reference"] for e in obs["entry"]} == {"Patient/pat1"}
    order = ids(get(fhir, "/Patient?_sort=age&_id=pat1,pat2"))
    assert order == ["pat2", "pat1"]  # the younger first
    assert ids(get(fhir, "/Patient?_sort=-age&_id=pat1,pat2")) == ["pat1", "pat2"]
    for query in ("age=x", "age=30.5", "age:missing=true", "age=-3"):
        oo = get(fhir, "/Patient?" + query, status=400)
        assert "age" in oo["issue"][0]["diagnostics"], (query, oo)


# ---------------------------------------------------------------- sorting and paging

SORTS = [
    ("Patient?_sort=birthdate", ["pat3", "pat1", "pat2"]),
    ("Patient?_sort=-birthdate", ["pat2", "pat3", "pat1"]),
    ("Patient?_sort=family", ["pat1", "pat3", "pat2"]),
    ("Patient?_sort=-family", ["pat2", "pat3", "pat1"]),
    ("Patient?_sort=gender,-birthdate", ["pat2", "pat3", "pat1"]),
    ("Patient?_sort=-_id", ["pat3", "pat2", "pat1"]),
    ("Patient?_sort=identifier", ["pat1", "pat2", "pat3"]),
    ("Observation?_sort=value-quantity", ["obs1", "obs3", "obs2", "obs4", "obs5", "obs6"]),
    ("Observation?_sort=-value-quantity", ["obs2", "obs3", "obs1", "obs4", "obs5", "obs6"]),
    ("Observation?_sort=subject,_id", ["obs1", "obs2", "obs6", "obs3", "obs4", "obs5"]),
    ("RiskAssessment?_sort=-probability", ["risk2", "risk1"]),
    ("Questionnaire?_sort=-url", ["q2", "q1"]),
]


@pytest.mark.parametrize(("query", "expected"), SORTS, ids=[s[0] for s in SORTS])
def test_sort(fhir: httpx.Client, query: str, expected: list[str]) -> None:
    assert ids(get(fhir, "/" + query)) == expected


def walk_forward(first: dict[str, Any]) -> list[dict[str, Any]]:
    """Every page, following the next links from ``first``."""
    pages, b = [first], first
    while (nxt := next((link["url"] for link in b["link"] if link["relation"] == "next"), None)):
        b = httpx.get(nxt, timeout=30).json()
        pages.append(b)
    return pages


def walk_back(last: dict[str, Any]) -> list[str]:
    """Ids of the pages before ``last``, following the previous links, in forward order."""
    back: list[str] = []
    b = last
    while (prev := next((link["url"] for link in b["link"] if link["relation"] == "previous"), None)):
        b = httpx.get(prev, timeout=30).json()
        back = ids(b) + back
    return back


@pytest.mark.parametrize("count", [1, 2, 4])
def test_paging_walks_forward_and_back(fhir: httpx.Client, count: int) -> None:
    order = ["obs1", "obs3", "obs2", "obs4", "obs5", "obs6"]
    b = get(fhir, f"/Observation?_sort=value-quantity&_count={count}")
    assert b["total"] == 6
    pages = walk_forward(b)
    assert all(len(ids(p)) <= count for p in pages)
    assert [i for p in pages for i in ids(p)] == order
    assert walk_back(pages[-1]) + ids(pages[-1]) == order


def test_paging_survives_concurrent_writes(fhir: httpx.Client) -> None:
    def dev(i: str) -> dict[str, Any]:
        return {"resourceType": "Device", "id": f"page-{i}", "status": "active"}

    for i in "bcdef":
        assert fhir.put(f"/Device/page-{i}", json=dev(i), headers=H).status_code in (200, 201)
    b = get(fhir, "/Device?_id=page-a,page-b,page-c,page-d,page-e,page-f,page-g&_count=2&_total=accurate")
    assert ids(b) == ["page-b", "page-c"] and b["total"] == 5
    nxt = next(link["url"] for link in b["link"] if link["relation"] == "next")
    # writes between the pages: one before the cursor, one deleted behind it, one after
    fhir.put("/Device/page-a", json=dev("a"), headers=H)
    fhir.delete("/Device/page-b")
    fhir.put("/Device/page-g", json=dev("g"), headers=H)
    b2 = httpx.get(nxt, timeout=30).json()
    assert ids(b2) == ["page-d", "page-e"]
    b3 = httpx.get(next(link["url"] for link in b2["link"] if link["relation"] == "next"), timeout=30).json()
    assert ids(b3) == ["page-f", "page-g"]


def test_total_modes_and_summary_count(fhir: httpx.Client) -> None:
    b = get(fhir, "/Observation?_count=2&_total=accurate")
    assert b["total"] == 6 and len(ids(b)) == 2
    delivered = ids(b)
    while (nxt := next((link["url"] for link in b["link"] if link["relation"] == "next"), None)):
        b = httpx.get(nxt, timeout=30).json()
        assert b["total"] == 6
        delivered += ids(b)
    assert len(delivered) == 6 == len(set(delivered))
    assert "total" not in get(fhir, "/Observation?_count=2&_total=none")
    assert get(fhir, "/Observation?_count=2&_total=estimate")["total"] == 6
    c = get(fhir, "/Observation?code=8867-4&_summary=count")
    assert c["total"] == 2 and "entry" not in c
    c0 = get(fhir, "/Observation?_count=0")
    assert c0["total"] == 6 and "entry" not in c0


def test_self_link_echoes_the_search(fhir: httpx.Client) -> None:
    b = get(fhir, "/Patient?gender=male&_sort=birthdate&_count=1")
    self_url = next(link["url"] for link in b["link"] if link["relation"] == "self")
    assert "gender=male" in self_url and "_sort=birthdate" in self_url and "_count=1" in self_url
    assert httpx.get(self_url, timeout=30).json()["entry"][0]["resource"]["id"] == "pat3"


def test_summary_and_elements(fhir: httpx.Client) -> None:
    b = get(fhir, "/Patient?_id=pat1&_elements=gender")
    r = b["entry"][0]["resource"]
    assert r["gender"] == "male" and "name" not in r and "birthDate" not in r
    assert any(t.get("code") == "SUBSETTED" for t in r["meta"]["tag"])
    r2 = get(fhir, "/Patient?_id=pat1&_summary=true")["entry"][0]["resource"]
    assert "name" in r2 and "gender" in r2
    r3 = get(fhir, "/Patient?_id=pat1&_summary=data")["entry"][0]["resource"]
    assert "text" not in r3 and "address" in r3


# ---------------------------------------------------------------- includes

def test_include_and_revinclude(fhir: httpx.Client) -> None:
    b = get(fhir, "/Observation?_id=obs1&_include=Observation:subject")
    assert ids(b) == ["obs1"] and ids(b, "include") == ["pat1"]
    assert b["total"] == 1
    b = get(fhir, "/Observation?_id=obs1&_include=Observation:performer:Practitioner")
    assert ids(b, "include") == ["doc1"]
    b = get(fhir, "/Observation?_id=obs1&_include=*")
    assert set(ids(b, "include")) == {"pat1", "enc1", "doc1"}
    b = get(fhir, "/Patient?_id=pat1&_revinclude=Observation:subject")
    assert ids(b) == ["pat1"] and set(ids(b, "include")) == {"obs1", "obs2", "obs6"}
    b = get(fhir, "/Patient?_id=pat1&_revinclude=*")
    assert {"obs1", "obs2", "obs6", "enc1", "cond1", "risk1", "list1", "pat3"} <= set(ids(b, "include"))
    b = get(fhir, "/Observation?_id=obs1&_include=Observation:patient&_include:iterate=Patient:organization")
    assert set(ids(b, "include")) == {"pat1", "org1"}
    b = get(fhir, "/Observation?_id=obs3&_include=Observation:patient&_include:iterate=Patient:organization"
                  "&_include:iterate=Organization:partof")
    assert set(ids(b, "include")) == {"pat2", "org2", "org1"}
    b = get(fhir, "/Organization?_id=org1&_revinclude=Patient:organization"
                  "&_revinclude:iterate=Observation:patient")
    assert set(ids(b, "include")) == {"pat1", "obs1", "obs2", "obs6"}
    b = get(fhir, "/Patient?_id=pat1&_include=Patient:organization&_summary=true")
    assert ids(b, "include") == ["org1"]


# ---------------------------------------------------------------- other entry points

def test_post_search_form_encoded(fhir: httpx.Client) -> None:
    r = fhir.post("/Patient/_search", content="name=kari&gender=male",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert ids(r.json()) == ["pat1"]


def test_system_search(fhir: httpx.Client) -> None:
    b = get(fhir, "/?_type=Patient,Practitioner&_id=pat1,doc1,org1")
    assert sorted(ids(b)) == ["doc1", "pat1"]
    b = get(fhir, "/?_id=pat1,doc1,org1")
    assert sorted(ids(b)) == ["doc1", "org1", "pat1"]
    b = get(fhir, "/?_type=Patient,Practitioner&name=rahimov")
    assert ids(b) == ["doc1"]
    b = get(fhir, "/?_tag=http://dhp.test/tag|vip")
    assert ids(b) == ["pat1"]
    # A parameter some listed types lack is refused: ignoring it would return every Patient, male or not.
    r = fhir.get("/", params={"_type": "Patient,Observation", "gender": "male"})
    assert r.status_code == 400 and "gender" in r.text and "Observation" in r.text
    assert r.json()["issue"][0]["expression"] == ["gender"]
    both = ids(get(fhir, "/?_type=Patient,Practitioner&gender=male"))
    assert both and set(both) == set(ids(get(fhir, "/Patient?gender=male"))) | set(
        ids(get(fhir, "/Practitioner?gender=male")))


def test_compartment_search(fhir: httpx.Client) -> None:
    assert set(ids(get(fhir, "/Patient/pat1/Observation"))) == {"obs1", "obs2", "obs6"}
    assert ids(get(fhir, "/Patient/pat1/Observation?code=8480-6")) == ["obs2"]
    assert set(ids(get(fhir, "/Patient/pat2/Encounter"))) == {"enc2"}
    everything = get(fhir, "/Patient/pat1/*")
    assert set(ids(everything)) == {"pat1", "pat3", "enc1", "obs1", "obs2", "obs6", "risk1", "cond1"}
    assert set(ids(get(fhir, "/Patient/pat1/*?_type=Observation,Condition"))) == {"obs1", "obs2", "obs6",
                                                                                    "cond1"}
    get(fhir, "/Patient/pat1/Organization", status=400)


def test_index_is_written_with_the_resource(fhir: httpx.Client, search_server: LiveServer) -> None:
    from sqlalchemy import func, select, union_all

    from dhp.store.search import TABLES

    def index_rows(rid: str) -> int:
        async def count() -> int:
            q = union_all(*(select(func.count()).select_from(t).where(t.c.type == "Patient", t.c.id == rid)
                            for t in TABLES.values())).subquery()
            async with search_server.server.store.read_conn() as conn:
                return int((await conn.execute(select(func.sum(q.c[0])))).scalar_one())

        return asyncio.run_coroutine_threadsafe(count(), search_server.loop).result(60)

    r = {"resourceType": "Patient", "id": "fresh1", "name": [{"family": "Yangiboyev"}], "gender": "other"}
    assert fhir.put("/Patient/fresh1", json=r, headers=H).status_code in (200, 201)
    assert ids(get(fhir, "/Patient?family=yangiboyev")) == ["fresh1"]
    r["name"] = [{"family": "Eskiboyev"}]
    assert fhir.put("/Patient/fresh1", json=r, headers=H).status_code == 200
    assert ids(get(fhir, "/Patient?family=yangiboyev")) == []
    assert ids(get(fhir, "/Patient?family=eskiboyev")) == ["fresh1"]
    assert index_rows("fresh1") > 0
    assert fhir.delete("/Patient/fresh1").status_code in (200, 204)
    assert ids(get(fhir, "/Patient?family=eskiboyev")) == []
    assert ids(get(fhir, "/Patient?gender=other")) == []
    assert index_rows("fresh1") == 0  # a delete leaves no index rows behind


def test_values_beyond_float_range_are_stored_and_found(fhir: httpx.Client) -> None:
    # 1e400 is a valid FHIR decimal but an infinite float: the index keeps it as such (PostgreSQL receives
    # index rows as JSON, which has no infinities) and range searches still place it.
    body = ('{"resourceType": "Observation", "id": "huge1", "status": "final", "code": {"text": "huge"}, '
            '"valueQuantity": {"value": 1e400, "system": "http://unitsofmeasure.org", "code": "mg"}}')
    r = fhir.put("/Observation/huge1", content=body, headers={**H, "Content-Type": "application/fhir+json"})
    assert r.status_code in (200, 201), r.text
    assert '"value": 1e400' in r.text or '"value":1e400' in r.text
    assert "huge1" in ids(get(fhir, "/Observation?value-quantity=gt1e300"))
    assert "huge1" not in ids(get(fhir, "/Observation?value-quantity=lt1e300"))


def test_values_longer_than_the_index_keeps_are_still_found(fhir: httpx.Client) -> None:
    # The index keeps 512 characters of a code or identifier and 255 of a normalised string: a search with
    # the whole longer value compares on that much instead of never matching.
    long_id, long_name = "I" * 600, "Uzunboyev" + "a" * 400
    r = fhir.put("/Patient/long1", json={"resourceType": "Patient", "id": "long1",
                                         "identifier": [{"system": "urn:x:long", "value": long_id}],
                                         "name": [{"family": long_name}]}, headers=H)
    assert r.status_code in (200, 201), r.text
    assert ids(get(fhir, f"/Patient?identifier=urn:x:long|{long_id}")) == ["long1"]
    assert ids(get(fhir, f"/Patient?family={long_name}")) == ["long1"]
    assert ids(get(fhir, f"/Patient?family:exact={long_name}")) == ["long1"]
    assert ids(get(fhir, f"/Patient?family:contains={long_name[:300]}")) == ["long1"]
    assert ids(get(fhir, f"/Patient?identifier=urn:x:long|{'J' * 600}")) == []


def test_nul_characters_are_stored_and_refused_in_searches(fhir: httpx.Client) -> None:
    # PostgreSQL text cannot hold U+0000: the resource keeps it, its index rows drop it, and no input with it
    # reaches a 5xx on either backend.
    hj = {"Content-Type": "application/fhir+json"}
    p = fhir.put("/Patient/nul1", content='{"resourceType": "Patient", "id": "nul1", "gender": "other", '
                 '"name": [{"family": "Nul\\u0000bek"}]}', headers=hj)
    assert p.status_code in (200, 201), p.text
    assert p.json()["name"][0]["family"] == "Nul\x00bek"
    o = fhir.post("/Observation", content='{"resourceType": "Observation", "status": "final", '
                  '"code": {"text": "x\\u0000y"}, "subject": {"reference": "Patient/p\\u0000q"}}', headers=hj)
    assert o.status_code == 201, o.text
    assert fhir.get(f"/Observation/{o.json()['id']}").json()["code"]["text"] == "x\x00y"
    assert ids(get(fhir, "/Patient?_id=nul1&gender=other")) == ["nul1"]
    for query, param in (("/Patient?family=Nul%00bek", "family"), ("/Patient?_id=nul1%00", "_id"),
                         ("/Patient?fam%00ily=x", "family"), ("/Observation?subject=Patient/p%00q", "subject")):
        body = get(fhir, query, 400)
        assert body["issue"][0]["expression"] == [param], body
        assert "NUL" in body["issue"][0]["diagnostics"]
    r = fhir.post("/Patient", json={"resourceType": "Patient"},
                  headers={**H, "If-None-Exist": "identifier=a%00b"})
    assert r.status_code == 400, r.text


def test_conditional_create_update_delete(fhir: httpx.Client) -> None:
    ident = f"{PINFL}|55500011122233"
    body = {"resourceType": "Patient", "identifier": [{"system": PINFL, "value": "55500011122233"}],
            "name": [{"family": "Shartli"}]}
    r1 = fhir.post("/Patient", json=body, headers={**H, "If-None-Exist": f"identifier={ident}"})
    assert r1.status_code == 201, r1.text
    r2 = fhir.post("/Patient", json=body, headers={**H, "If-None-Exist": f"identifier={ident}"})
    assert r2.status_code == 200
    assert r2.json()["id"] == r1.json()["id"]
    # several matches → 412
    r3 = fhir.post("/Patient", json=body, headers={**H, "If-None-Exist": "gender=male"})
    assert r3.status_code == 412
    # conditional update finds the one match
    body["name"] = [{"family": "Shartliyev"}]
    r4 = fhir.put(f"/Patient?identifier={ident}", json=body, headers=H)
    assert r4.status_code == 200 and r4.json()["id"] == r1.json()["id"]
    assert ids(get(fhir, "/Patient?family=shartliyev")) == [r1.json()["id"]]
    r5 = fhir.delete(f"/Patient?identifier={ident}")
    assert r5.status_code in (200, 204)
    assert ids(get(fhir, f"/Patient?identifier={ident}")) == []


def test_conditional_reference_in_transaction(fhir: httpx.Client) -> None:
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": {"resourceType": "Observation", "status": "final", "id": "cref",
                     "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                     "subject": {"reference": f"Patient?identifier={PINFL}|31234567890123"}},
        "request": {"method": "PUT", "url": "Observation/cref"}}]}
    r = fhir.post("", json=tx, headers=H)
    assert r.status_code == 200, r.text
    b = get(fhir, "/Observation?subject=Patient/pat1&code=29463-7")
    assert ids(b) == ["cref"]
    tx["entry"][0]["resource"]["subject"]["reference"] = "Patient?gender=male"
    r = fhir.post("", json=tx, headers=H)
    assert r.status_code == 412, r.text
    assert fhir.delete("/Observation/cref").status_code in (200, 204)


def test_updates_inside_a_transaction_change_the_index(fhir: httpx.Client) -> None:
    """Updates in a transaction read their current versions in one locked batch; each changes only its rows,
    and a search afterwards sees exactly the new values."""
    pats = [{"resourceType": "Patient", "id": f"txu{i}", "gender": "female",
             "telecom": [{"system": "phone", "value": f"+99890700000{i}"}], "name": [{"family": f"Txuser{i}"}]}
            for i in range(3)]
    for p in pats:
        assert fhir.put(f"/Patient/{p['id']}", json=p, headers=H).status_code in (200, 201)
    entries = [{"resource": {**p, "telecom": [{"system": "phone", "value": f"+99890800000{i}"}]},
                "request": {"method": "PUT", "url": f"Patient/{p['id']}"}} for i, p in enumerate(pats)]
    r = fhir.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=H)
    assert r.status_code == 200, r.text
    for i in range(3):
        assert ids(get(fhir, f"/Patient?phone=%2B99890700000{i}")) == []
        assert ids(get(fhir, f"/Patient?phone=%2B99890800000{i}")) == [f"txu{i}"]
        assert ids(get(fhir, f"/Patient?family=txuser{i}&gender=female")) == [f"txu{i}"]
    for p in pats:
        assert fhir.delete(f"/Patient/{p['id']}").status_code in (200, 204)


def test_search_parameter_created_in_a_transaction_takes_effect_at_its_commit(fhir: httpx.Client) -> None:
    """A SearchParameter and a resource it indexes in one transaction Bundle: the very next search knows the
    parameter (the transaction reloads the definitions when it commits); the resource, indexed before the
    parameter existed, is found once the background job has indexed what was there."""
    sp = {"resourceType": "SearchParameter", "status": "active", "name": "mothersmaiden",
          "url": "http://dhp.test/SearchParameter/patient-mothers-maiden", "code": "mothers-maiden",
          "base": ["Patient"], "type": "string", "description": "Mother's maiden name",
          "expression": "Patient.extension('http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName')"
                        ".value.ofType(string)"}
    pat = {"resourceType": "Patient", "extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": "Yusupova"}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": sp, "request": {"method": "POST", "url": "SearchParameter"}},
        {"resource": pat, "request": {"method": "POST", "url": "Patient"}}]}
    r = fhir.post("", json=bundle, headers=H)
    assert r.status_code == 200, r.text
    sp_loc, pat_loc = (e["response"]["location"] for e in r.json()["entry"])
    pid = pat_loc.split("/")[1]
    try:
        strict = {"Prefer": "handling=strict"}
        found = ids(get(fhir, "/Patient?mothers-maiden=yusup", headers=strict))  # 400 if it were unknown
        deadline = time.time() + 30
        while found != [pid] and time.time() < deadline:
            time.sleep(0.2)
            found = ids(get(fhir, "/Patient?mothers-maiden=yusup", headers=strict))
        assert found == [pid]
    finally:
        assert fhir.delete("/" + "/".join(sp_loc.split("/")[:2])).status_code in (200, 204)
        assert fhir.delete(f"/Patient/{pid}").status_code in (200, 204)


def test_search_parameter_created_through_the_api(fhir: httpx.Client, search_server: LiveServer) -> None:
    ext = "http://dhp.test/StructureDefinition/nickname"
    old = {"resourceType": "Patient", "id": "nick-old", "extension": [{"url": ext, "valueString": "Bahodir"}]}
    assert fhir.put("/Patient/nick-old", json=old, headers=H).status_code in (200, 201)
    sp = {"resourceType": "SearchParameter", "id": "patient-nickname", "status": "active", "name": "nickname",
          "url": "http://dhp.test/SearchParameter/patient-nickname", "code": "nickname", "base": ["Patient"],
          "type": "string", "description": "Nickname",
          "expression": f"Patient.extension('{ext}').value.ofType(string)"}
    r = fhir.put("/SearchParameter/patient-nickname", json=sp, headers=H)
    assert r.status_code in (200, 201), r.text
    new = {"resourceType": "Patient", "id": "nick-new", "extension": [{"url": ext, "valueString": "Bahrom"}]}
    assert fhir.put("/Patient/nick-new", json=new, headers=H).status_code in (200, 201)
    strict = {"Prefer": "handling=strict"}
    assert ids(get(fhir, "/Patient?nickname=bahr", headers=strict)) == ["nick-new"]
    # data written before the parameter existed: indexed by the background job (or $reindex)
    deadline = time.time() + 30
    while time.time() < deadline and ids(get(fhir, "/Patient?nickname=bahod")) != ["nick-old"]:
        time.sleep(0.2)
    assert ids(get(fhir, "/Patient?nickname=bahod")) == ["nick-old"]  # by the background job, unasked
    r = fhir.post("/Patient/$reindex", json={"resourceType": "Parameters",
                                            "parameter": [{"name": "code", "valueString": "nickname"}]},
                  headers=H)
    assert r.status_code == 200, r.text
    assert ids(get(fhir, "/Patient?nickname=bahod")) == ["nick-old"]
    assert ids(get(fhir, "/Patient?nickname=ba&_sort=nickname")) == ["nick-old", "nick-new"]
    r = fhir.post("/Patient/nick-new/$reindex", json={"resourceType": "Parameters"}, headers=H)
    assert r.status_code == 200, r.text
    assert ids(get(fhir, "/Patient?nickname=bahr")) == ["nick-new"]
    assert fhir.post("/Patient/no-such-one/$reindex", json={"resourceType": "Parameters"},
                     headers=H).status_code == 404
    r = fhir.post("/$reindex", json={"resourceType": "Parameters",
                                     "parameter": [{"name": "mode", "valueString": "status"}]}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "Parameters" and r.json()["parameter"]


@pytest.mark.parametrize(("sort", "expected"), [("url", ["q1", "q2", "q-nourl"]), ("-url", ["q2", "q1", "q-nourl"])])
def test_paging_on_a_single_valued_key_reaches_resources_without_a_value(fhir: httpx.Client, sort: str,
                                                                          expected: list[str]) -> None:
    r = fhir.put("/Questionnaire/q-nourl", json={"resourceType": "Questionnaire", "id": "q-nourl",
                                                 "status": "draft"}, headers=H)
    assert r.status_code in (200, 201)
    b = get(fhir, f"/Questionnaire?_id=q1,q2,q-nourl&_sort={sort}&_count=1")
    seen, pages = ids(b), [b]
    while (nxt := next((link["url"] for link in b["link"] if link["relation"] == "next"), None)):
        b = httpx.get(nxt, timeout=30).json()
        seen += ids(b)
        pages.append(b)
    assert seen == expected
    back = []
    b = pages[-1]
    while (prev := next((link["url"] for link in b["link"] if link["relation"] == "previous"), None)):
        b = httpx.get(prev, timeout=30).json()
        back = ids(b) + back
    assert back + ids(pages[-1]) == expected
    assert ids(get(fhir, f"/Questionnaire?_id=q1,q2,q-nourl&_sort={sort}&_count=2")) == expected[:2]


def test_default_order_pages_and_total_come_from_the_index(fhir: httpx.Client) -> None:
    """An index condition drives the default (id) order: pages and total are taken from the index tables,
    which hold live resources only — a deleted resource is neither counted nor paged, and the previous links
    walk back over the same pages."""
    import uuid

    tag = uuid.uuid4().hex[:8]
    made = [f"dflt-{tag}-{i}" for i in range(7)]
    for rid in made:
        r = fhir.put(f"/Device/{rid}", headers=H, json={
            "resourceType": "Device", "id": rid, "status": "active",
            "identifier": [{"system": "urn:dhp:test:paging", "value": tag}]})
        assert r.status_code in (200, 201)
    assert fhir.delete(f"/Device/{made[3]}").status_code in (200, 204)
    live = sorted(made[:3] + made[4:])
    b = get(fhir, f"/Device?identifier=urn:dhp:test:paging|{tag}&_count=2")
    assert b["total"] == 6
    pages = walk_forward(b)
    assert [i for p in pages for i in ids(p)] == live and len(pages) == 3
    assert walk_back(pages[-1]) + ids(pages[-1]) == live
    summary = get(fhir, f"/Device?identifier=urn:dhp:test:paging|{tag}&_summary=count")
    assert summary["total"] == 6


def test_shared_parameters_in_includes_and_sorting(fhir: httpx.Client) -> None:
    """``patient`` reads ``subject``'s rows that point at a Patient; ``name`` sorts on all of its parts."""
    b = get(fhir, "/Observation?_id=obs3&_include=Observation:patient")
    assert ids(b) == ["obs3"] and ids(b, "include") == ["pat2"]
    b = get(fhir, "/Patient?_id=pat2&_revinclude=Observation:patient")
    assert ids(b) == ["pat2"] and set(ids(b, "include")) == {"obs3", "obs4"}
    b = get(fhir, "/Encounter?_id=enc1&_include=Encounter:practitioner")
    assert ids(b, "include") == ["doc1"]
    # lowest part: alisher (given), jose (given), o'g'iloy (given); highest: the Cyrillic text, to'xtayeva, nunez
    assert ids(get(fhir, "/Patient?_id=pat1,pat2,pat3&_sort=name")) == ["pat1", "pat3", "pat2"]
    assert ids(get(fhir, "/Patient?_id=pat1,pat2,pat3&_sort=-name")) == ["pat1", "pat2", "pat3"]


def test_a_new_parameter_takes_its_part_out_of_a_shared_one_and_gives_it_back(fhir: httpx.Client) -> None:
    """A parameter on a HumanName part becomes a source of ``name``; deleting it reindexes ``name`` with the
    part again (else ``name`` would no longer find it)."""
    def wait_for(url: str, want: list[str]) -> list[str]:
        deadline = time.time() + 30
        while (got := ids(get(fhir, url))) != want and time.time() < deadline:
            time.sleep(0.2)
        return got

    p = {"resourceType": "Patient", "id": "pfx", "name": [{"prefix": ["Professor"], "family": "Qodirov"}]}
    assert fhir.put("/Patient/pfx", json=p, headers=H).status_code in (200, 201)
    sp = {"resourceType": "SearchParameter", "id": "patient-name-prefix", "status": "active", "name": "prefix",
          "url": "http://dhp.test/SearchParameter/patient-name-prefix", "code": "name-prefix", "base": ["Patient"],
          "type": "string", "description": "Name prefix", "expression": "Patient.name.prefix"}
    assert fhir.put("/SearchParameter/patient-name-prefix", json=sp, headers=H).status_code in (200, 201)
    try:
        assert wait_for("/Patient?name-prefix=profes", ["pfx"]) == ["pfx"]
        assert ids(get(fhir, "/Patient?name=profes")) == ["pfx"]
    finally:
        assert fhir.delete("/SearchParameter/patient-name-prefix").status_code in (200, 204)
    assert wait_for("/Patient?name=profes", ["pfx"]) == ["pfx"]
    get(fhir, "/Patient?name-prefix=profes", status=400, headers={"Prefer": "handling=strict"})
    assert fhir.delete("/Patient/pfx").status_code in (200, 204)


# ------------------------------------------------------------------ open reindex jobs (search_reindex)

def _on_loop(live: LiveServer, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, live.loop).result(60)


def _job_rows(live: LiveServer) -> dict[int, dict[str, Any]]:
    from sqlalchemy import select

    from dhp.store.search import reindex_jobs

    async def rows() -> dict[int, dict[str, Any]]:
        async with live.server.store.read_conn() as conn:
            return {r.id: dict(r._mapping) for r in (await conn.execute(select(reindex_jobs))).all()}

    return _on_loop(live, rows())


def _add_job(live: LiveServer, job_id: int, types: list[str], codes: list[str] | None, owner: str,
             age_s: float) -> None:
    import json as _json

    from sqlalchemy import insert

    from dhp.store.search import reindex_jobs

    async def add() -> None:
        async with live.server.store.begin() as tx:
            await tx.conn.execute(insert(reindex_jobs).values(
                id=job_id, types=_json.dumps(types), codes=None if codes is None else _json.dumps(codes), owner=owner,
                heartbeat=time.time_ns() // 1000 - int(age_s * 1e6), done=0, total=0))

    _on_loop(live, add())


def _finish_job(live: LiveServer, job_id: int) -> None:
    from sqlalchemy import update

    from dhp.store.search import reindex_jobs

    async def finish() -> None:
        async with live.server.store.begin() as tx:
            await tx.conn.execute(update(reindex_jobs).where(reindex_jobs.c.id == job_id)
                                  .values(finished=time.time_ns() // 1000))

    _on_loop(live, finish())


def _sync_jobs(live: LiveServer) -> None:
    _on_loop(live, live.server.search.sync_jobs(live.server.store))


def _reindex_warnings(bundle: dict[str, Any]) -> list[str]:
    return [i["diagnostics"] for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]
            if i.get("details", {}).get("coding", [{}])[0].get("code") == "search-reindex-pending"]


def test_a_search_parameter_write_records_its_reindex_job_in_the_same_transaction(
        fhir: httpx.Client, search_server: LiveServer) -> None:
    """The job row commits with the SearchParameter (types and codes of the new and the old definition), is
    run by the process that wrote it, and is closed when the existing resources are reindexed; a delete of the
    parameter opens and closes another."""
    before = set(_job_rows(search_server))
    sp = {"resourceType": "SearchParameter", "id": "patient-birth-order", "status": "active", "name": "birthorder",
          "url": "http://dhp.test/SearchParameter/patient-birth-order", "code": "birth-order",
          "base": ["Patient"], "type": "number", "description": "Birth order",
          "expression": "Patient.multipleBirth.ofType(integer)"}
    r = fhir.put("/SearchParameter/patient-birth-order", json=sp, headers=H)
    assert r.status_code in (200, 201), r.text
    new = {k: v for k, v in _job_rows(search_server).items() if k not in before}
    assert len(new) == 1
    (job_id, row), = new.items()
    assert row["codes"] == '["birth-order"]' and row["owner"] == search_server.server.search.owner
    deadline = time.time() + 30
    while _job_rows(search_server)[job_id]["finished"] is None and time.time() < deadline:
        time.sleep(0.1)
    row = _job_rows(search_server)[job_id]
    assert row["finished"] is not None and row["error"] is None
    assert row["types"] == '["Patient"]' and row["total"] == row["done"] > 0  # the data set has Patients
    assert fhir.delete("/SearchParameter/patient-birth-order").status_code in (200, 204)
    later = {k: v for k, v in _job_rows(search_server).items() if k not in before and k != job_id}
    assert [v["codes"] for v in later.values()] == ['["birth-order"]']


def test_searches_on_a_parameter_being_reindexed_say_matches_may_be_missing(
        fhir: httpx.Client, search_server: LiveServer) -> None:
    """An open job (another process runs it: fresh heartbeat) makes every search naming its parameter carry a
    warning — directly, chained, in ``_sort`` — and no other search; once closed, the warning goes."""
    job_id = 4_000_000_001
    _add_job(search_server, job_id, ["Patient"], ["family"], "another-process", age_s=0)
    try:
        _sync_jobs(search_server)
        b = get(fhir, "/Patient?family=karimov")
        assert ids(b) == ["pat1"]  # the rows there are still searched
        warned = _reindex_warnings(b)
        assert len(warned) == 1 and "family" in warned[0] and str(job_id) in warned[0]
        assert _reindex_warnings(get(fhir, "/Patient?gender=male&_sort=family"))
        assert _reindex_warnings(get(fhir, "/Observation?subject:Patient.family=karimov"))
        assert not _reindex_warnings(get(fhir, "/Patient?gender=male"))
        assert not _reindex_warnings(get(fhir, "/Organization?name=toshkent"))  # no family on Organization
        assert _job_rows(search_server)[job_id]["owner"] == "another-process"  # alive: not taken over
    finally:
        _finish_job(search_server, job_id)
    _sync_jobs(search_server)
    assert not _reindex_warnings(get(fhir, "/Patient?family=karimov"))
    # A job over all of a type's parameters: any search parameter on it warns, result parameters alone do not.
    job_id = 4_000_000_003
    _add_job(search_server, job_id, ["Organization"], None, "another-process", age_s=0)
    try:
        _sync_jobs(search_server)
        assert _reindex_warnings(get(fhir, "/Organization?name=toshkent"))
        assert not _reindex_warnings(get(fhir, "/Organization?_count=5&_total=accurate"))
        assert not _reindex_warnings(get(fhir, "/Patient?gender=male"))
    finally:
        _finish_job(search_server, job_id)
    _sync_jobs(search_server)


def test_a_reindex_job_whose_process_stopped_is_taken_over(fhir: httpx.Client, search_server: LiveServer) -> None:
    """A job left open by a process that died (stale heartbeat) is claimed and run by another: rows it never
    wrote appear, and the job is closed under its new owner."""
    from sqlalchemy import delete

    from dhp.store.search import TABLES

    p = {"resourceType": "Patient", "id": "orphan-job", "name": [{"family": "Qaytaindeksov"}]}
    assert fhir.put("/Patient/orphan-job", json=p, headers=H).status_code in (200, 201)
    t = TABLES["string"]

    async def drop_rows() -> None:  # as if the parameter had changed and its job never ran
        async with search_server.server.store.begin() as tx:
            await tx.conn.execute(delete(t).where(t.c.type == "Patient", t.c.id == "orphan-job",
                                                  t.c.code == "family"))

    _on_loop(search_server, drop_rows())
    try:
        assert ids(get(fhir, "/Patient?family=qaytaindeksov")) == []
        job_id = 4_000_000_002
        _add_job(search_server, job_id, ["Patient"], ["family"], "a-process-that-died", age_s=600)
        _sync_jobs(search_server)
        deadline = time.time() + 30
        while _job_rows(search_server)[job_id]["finished"] is None and time.time() < deadline:
            time.sleep(0.1)
        row = _job_rows(search_server)[job_id]
        assert row["finished"] is not None and row["error"] is None
        assert row["owner"] == search_server.server.search.owner
        assert ids(get(fhir, "/Patient?family=qaytaindeksov")) == ["orphan-job"]
    finally:
        assert fhir.delete("/Patient/orphan-job").status_code in (200, 204)
