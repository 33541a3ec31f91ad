"""The engine in-process on a real store (SQLite and PostgreSQL): authorisation filters, terminology modifiers,
conditional matching inside a transaction, bulk indexing and reindexing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dhp import fhirjson
from dhp.errors import FHIRError
from dhp.interactions.context import RequestContext, Server
from dhp.interactions.search import find_ids, search_compartment, search_type
from dhp.search import SearchEngine
from dhp.settings import Settings
from dhp.store import Store, StoredResource, now_us

CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def _data() -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "id": "a", "gender": "female",
         "name": [{"family": "Aliyeva", "given": ["Aliya"]}]},
        {"resourceType": "Patient", "id": "b", "gender": "male", "name": [{"family": "Boboyev"}]},
        {"resourceType": "Patient", "id": "c", "gender": "unknown", "name": [{"family": "Choriyev"}]},
        {"resourceType": "Organization", "id": "org", "name": "Markaz"},
        {"resourceType": "Condition", "id": "ca", "subject": {"reference": "Patient/a"},
         "clinicalStatus": {"coding": [{"system": CLIN, "code": "active"}]}},
        {"resourceType": "Condition", "id": "cb", "subject": {"reference": "Patient/b"},
         "clinicalStatus": {"coding": [{"system": CLIN, "code": "relapse"}]}},
        {"resourceType": "Condition", "id": "cc", "subject": {"reference": "Patient/c"},
         "clinicalStatus": {"coding": [{"system": CLIN, "code": "resolved"}]}},
        {"resourceType": "Observation", "id": "oa", "status": "final", "subject": {"reference": "Patient/a"},
         "code": {"text": "x"}, "performer": [{"reference": "Organization/org"}]},
        {"resourceType": "Observation", "id": "ob", "status": "amended", "subject": {"reference": "Patient/b"},
         "code": {"text": "x"}},
    ]


@pytest.fixture(scope="module", params=["sqlite", "pg"])
async def live(request: pytest.FixtureRequest, registry: Any, new_db_url: Callable[[str], str],
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    url = new_db_url(request.param)
    store = Store(url)
    await store.open()
    settings = Settings.from_env(database_url=url)
    server = Server(settings, registry, store)
    try:
        from dhp.terminology.engine import Terminology

        server.terminology = Terminology(registry)
    except ImportError:
        server.terminology = None
    server.search = SearchEngine(registry, server.terminology)
    items = []
    ts = now_us()
    async with store.begin() as tx:
        for r in _data():
            r = {**r, "meta": {"versionId": "1"}}
            content = fhirjson.dumps(r)
            await tx.put(StoredResource(r["resourceType"], r["id"], 1, ts, False, content), "PUT",
                         exists_before=False)
            items.append((r["resourceType"], r["id"], content))
        await server.search.index_many(tx, items)
    yield server
    await store.close()
    _ = Path


@dataclass
class FakePrincipal:
    """The attributes dhp.auth's principal exposes to search (a plain value object, not a stand-in for a service)."""

    patient: str | None = None
    filters: dict[str, list[Any]] = field(default_factory=dict)

    def query_filters(self, interaction: str, rtype: str) -> list[Any] | None:
        assert interaction == "s"
        return self.filters.get(rtype)


def ids(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


def ctx(principal: Any = None, strict: bool = False) -> RequestContext:
    return RequestContext(base_url="http://test/fhir", principal=principal,
                          prefer={"handling": "strict"} if strict else {})


async def test_patient_scope_restricts_to_the_compartment(live: Server) -> None:
    p = FakePrincipal(patient="a")
    assert ids(await search_type(live, ctx(p), "Observation", [])) == {"oa"}
    assert ids(await search_type(live, ctx(p), "Patient", [])) == {"a"}
    assert ids(await search_type(live, ctx(p), "Condition", [("clinical-status", "relapse")])) == set()
    # Organization is outside the Patient compartment: a patient/ scope does not confine it (as a read of one
    # Organization is allowed by check_resource); the token's scopes alone decide
    assert ids(await search_type(live, ctx(p), "Organization", [])) == {"org"}
    # included resources obey the same rule: compartment types confined, others not
    b = await search_type(live, ctx(p), "Observation", [("_include", "Observation:performer")])
    assert ids(b) == {"oa"} and ids(b, "include") == {"org"}
    b = await search_type(live, ctx(p), "Organization", [("_revinclude", "Observation:performer")])
    assert ids(b) == {"org"} and ids(b, "include") == {"oa"}
    b = await search_type(live, ctx(), "Observation", [("_include", "Observation:performer")])
    assert ids(b, "include") == {"org"}


async def test_query_filters_are_anded_and_sets_ored(live: Server) -> None:
    p = FakePrincipal(filters={"Observation": [[("status", "final")], [("status", "amended"), ("subject", "b")]],
                               "Patient": ["gender=female"]})
    assert ids(await search_type(live, ctx(p), "Observation", [])) == {"oa", "ob"}
    assert ids(await search_type(live, ctx(p), "Observation", [("subject", "a")])) == {"oa"}
    assert ids(await search_type(live, ctx(p), "Patient", [])) == {"a"}
    assert ids(await search_type(live, ctx(p), "Condition", [])) == {"ca", "cb", "cc"}


async def test_terminology_modifiers(live: Server) -> None:
    if live.terminology is None or not hasattr(live.terminology, "expand_codes"):
        pytest.skip("the terminology service is not in this build")
    c = ctx()
    got = await search_type(live, c, "Condition", [("clinical-status:below", f"{CLIN}|active")])
    assert ids(got) == {"ca", "cb"}  # relapse is below active
    got = await search_type(live, c, "Condition", [("clinical-status:above", f"{CLIN}|relapse")])
    assert ids(got) == {"ca", "cb"}
    vs = "http://hl7.org/fhir/ValueSet/condition-clinical"
    assert ids(await search_type(live, c, "Condition", [("clinical-status:in", vs)])) == {"ca", "cb", "cc"}
    assert ids(await search_type(live, c, "Condition", [("clinical-status:not-in", vs)])) == set()
    # a bare code element is matched through its value set's system
    gvs = "http://hl7.org/fhir/ValueSet/administrative-gender"
    assert ids(await search_type(live, c, "Patient", [("gender:in", gvs)])) == {"a", "b", "c"}
    with pytest.raises(FHIRError) as e:
        await search_type(live, c, "Condition", [("clinical-status:in", "http://nowhere/ValueSet/x")])
    assert e.value.status == 400


async def test_without_terminology_the_modifiers_refuse(live: Server) -> None:
    saved = live.search.terminology
    live.search.terminology = None
    try:
        with pytest.raises(FHIRError) as e:
            await search_type(live, ctx(), "Condition", [("clinical-status:below", f"{CLIN}|active")])
        assert e.value.status == 400 and "terminology" in str(e.value)
    finally:
        live.search.terminology = saved


async def test_find_ids_sees_its_own_transaction(live: Server) -> None:
    rid = "t-" + uuid.uuid4().hex[:6]
    async with live.store.begin() as tx:
        r = {"resourceType": "Patient", "id": rid, "meta": {"versionId": "1"},
             "identifier": [{"system": "urn:test", "value": rid}]}
        await tx.put(StoredResource("Patient", rid, 1, now_us(), False, fhirjson.dumps(r)), "POST",
                     exists_before=False)
        await live.search.index(tx, "Patient", rid, r)
        assert await find_ids(live, "Patient", [("identifier", f"urn:test|{rid}")], tx=tx) == [rid]
        assert await find_ids(live, "Patient", [("identifier", f"urn:test|{rid}"), ("gender", "male")],
                              tx=tx) == []
    assert await find_ids(live, "Patient", [("identifier", f"urn:test|{rid}")]) == [rid]
    assert sorted(await find_ids(live, "Patient", [("gender", "male,female")])) == ["a", "b"]
    # several matching rows of one resource are one match (conditional create must not see "2")
    assert await find_ids(live, "Patient", [("name", "ali")]) == ["a"]
    with pytest.raises(FHIRError):
        await find_ids(live, "Patient", [("nonsense", "1")])  # must not match everything
    with pytest.raises(FHIRError):
        await find_ids(live, "Patient", [])
    async with live.store.begin() as tx:
        await live.search.unindex(tx, "Patient", rid)
    assert await find_ids(live, "Patient", [("identifier", f"urn:test|{rid}")]) == []


async def test_reindex_rebuilds_rows(live: Server) -> None:
    from dhp.store import search as sql

    async with live.store.begin() as tx:  # the index rows of Patient/b go missing
        await tx.replace_index("Patient", "b", {}, tuple(sql.TABLES), fresh=False)
    assert ids(await search_type(live, ctx(), "Patient", [("family", "boboyev")])) == set()
    job = await live.search.reindex(live.store, ["Patient"], ["family"])
    assert job.error is None and job.done == job.total >= 3
    assert ids(await search_type(live, ctx(), "Patient", [("family", "boboyev")])) == {"b"}
    assert ids(await search_type(live, ctx(), "Patient", [("gender", "male")])) == set()  # only family rebuilt
    job = await live.search.reindex(live.store, ["Patient"])
    assert ids(await search_type(live, ctx(), "Patient", [("gender", "male")])) == {"b"}
    # a full reindex replaces rows, it does not duplicate them
    b = await search_type(live, ctx(), "Patient", [("family", "a,b,c"), ("_total", "accurate")])
    assert b["total"] == 3


async def test_compartment_everything(live: Server) -> None:
    b = await search_compartment(live, ctx(), "Patient", "a", "*", [])
    assert ids(b) == {"a", "ca", "oa"}
    with pytest.raises(FHIRError):
        await search_compartment(live, ctx(), "Observation", "x", "*", [])


async def test_includes_beyond_the_limit_are_cut_with_a_warning(live: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import dhp.interactions.search as mod

    monkeypatch.setattr(mod, "MAX_INCLUDES", 1)
    b = await search_type(live, ctx(), "Patient", [("_id", "a"), ("_revinclude", "*")])
    assert ids(b) == {"a"} and len(ids(b, "include")) == 1
    outcome = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and outcome[0]["issue"][0]["severity"] == "warning"
    assert "include" in outcome[0]["issue"][0]["diagnostics"]


async def test_parameters_sharing_rows_write_none_of_their_own(live: Server) -> None:
    """combo-code = code | component.code, patient = subject.where(resolve() is Patient), phonetic = name, and
    name's family/given parts are family's and given's rows: each value is written once."""
    obs = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/a"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
           "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}}]}
    rows = live.search.rows("Observation", "o", obs)
    codes = {r[2] for lst in rows.values() for r in lst}
    assert {"code", "component-code", "subject"} <= codes
    assert not codes & {"combo-code", "patient"}
    assert live.search.sources("Observation", "combo-code") == (("code", None), ("component-code", None))
    assert live.search.sources("Observation", "patient") == (("subject", "Patient"),)
    full = live.search.rows("Observation", "o", obs, full=True)
    assert {"combo-code", "patient"} <= {r[2] for lst in full.values() for r in lst}
    pat = {"resourceType": "Patient", "name": [{"family": "Aliyeva", "given": ["Aliya"], "prefix": ["Dr"]}]}
    strings = {(r[2], r[4]) for r in live.search.rows("Patient", "p", pat)["string"]}
    assert strings == {("family", "Aliyeva"), ("given", "Aliya"), ("name", "Dr")}
    assert live.search.sources("Patient", "phonetic") == (("name", None), ("family", None), ("given", None))
    assert live.search.sources("Patient", "gender") is None
