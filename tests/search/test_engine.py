"""The engine in-process on a real store (SQLite and PostgreSQL): authorisation filters, terminology modifiers,
conditional matching inside a transaction, bulk indexing and reindexing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
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
        {"resourceType": "CodeSystem", "id": "cs2", "url": "http://x/CodeSystem/cs2", "status": "active",
         "content": "complete", "relatedArtifact": [
             {"type": "derived-from", "resource": "http://x/CodeSystem/base|1.0"},
             {"type": "predecessor", "resource": "http://x/CodeSystem/cs1"}]},
        {"resourceType": "Linkage", "id": "lk", "item": [{"type": "source", "resource": {"reference": "Patient/a"}},
                                                          {"type": "alternate", "resource": {"reference": "Patient/c"}}]},
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


async def test_references_named_resource_are_searchable(live: Server) -> None:
    """``relatedArtifact.resource`` (a canonical) and ``Linkage.item.resource`` (a Reference) are references like
    any other: only a Bundle's ``entry.resource`` holds a resource whose own parameters are indexed instead."""
    assert ids(await search_type(live, ctx(), "CodeSystem", [("derived-from", "http://x/CodeSystem/base")])) \
        == {"cs2"}
    assert ids(await search_type(live, ctx(), "CodeSystem", [("derived-from", "http://x/CodeSystem/base|1.0")])) \
        == {"cs2"}
    assert ids(await search_type(live, ctx(), "CodeSystem", [("predecessor", "http://x/CodeSystem/cs1")])) \
        == {"cs2"}
    assert ids(await search_type(live, ctx(), "CodeSystem", [("predecessor", "http://x/CodeSystem/cs9")])) == set()
    assert ids(await search_type(live, ctx(), "Linkage", [("item", "Patient/c")])) == {"lk"}
    assert ids(await search_type(live, ctx(), "Linkage", [("item", "Patient/b")])) == set()


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
    # a union of unions: value-quantity (value as Quantity | SampledData) | component-value-quantity
    assert set(live.search.sources("Observation", "combo-value-quantity") or ()) == {
        ("value-quantity", None), ("component-value-quantity", None)}
    q = {**obs, "valueQuantity": {"value": 5, "unit": "mg"}}
    assert "combo-value-quantity" not in {r[2] for r in live.search.rows("Observation", "o", q)["quantity"]}
    full = live.search.rows("Observation", "o", obs, full=True)
    assert {"combo-code", "patient"} <= {r[2] for lst in full.values() for r in lst}
    pat = {"resourceType": "Patient", "name": [{"family": "Aliyeva", "given": ["Aliya"], "prefix": ["Dr"]}]}
    strings = {(r[2], r[4]) for r in live.search.rows("Patient", "p", pat)["string"]}
    assert strings == {("family", "Aliyeva"), ("given", "Aliya"), ("name", "Dr")}
    assert live.search.sources("Patient", "phonetic") == (("name", None), ("family", None), ("given", None))
    assert live.search.sources("Patient", "gender") is None


async def _stored_rows(live: Server, rtype: str, rid: str) -> dict[str, dict[tuple[Any, ...], Any]]:
    """The resource's index rows as stored, per table: row values → physical row address (SQLite rowid,
    PostgreSQL ctid), which changes when a row is deleted and written again."""
    from sqlalchemy import literal_column, select

    from dhp.store import search as sql

    addr = "rowid" if live.store.is_sqlite else "ctid::text"
    out: dict[str, dict[tuple[Any, ...], Any]] = {}
    async with live.store.read_conn() as conn:
        for kind, t in sql.TABLES.items():
            q = select(literal_column(addr), *t.c).where(t.c.type == rtype, t.c.id == rid)
            for row in (await conn.execute(q)).all():
                out.setdefault(kind, {})[tuple(row[1:])] = row[0]
    return out


def _as_sets(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, set[tuple[Any, ...]]]:
    return {k: set(v) for k, v in rows.items() if v}


async def test_an_update_rewrites_only_the_index_rows_that_changed(live: Server) -> None:
    from sqlalchemy import update

    from dhp.interactions import crud
    from dhp.store.schema import resources

    pat = {"resourceType": "Patient", "gender": "female", "birthDate": "1990-01-02",
           "identifier": [{"system": "https://dpm.uz/identifier/national-unique-id", "value": "41111111111111"}],
           "name": [{"family": "Yusupova", "given": ["Malika", "Zarina"]}],
           "telecom": [{"system": "phone", "value": "+998901111111"}],
           "managingOrganization": {"reference": "Organization/org"}}
    rid = (await crud.create(live, ctx(), "Patient", pat)).rec.id

    async def later_rows() -> None:
        # Rows written after this resource's: SQLite gives a row written again a new rowid only when the
        # deleted one was not the table's last.
        await crud.create(live, ctx(), "Patient", {"resourceType": "Patient", "gender": "male",
                                                   "birthDate": "2001", "name": [{"family": "Filler"}],
                                                   "managingOrganization": {"reference": "Organization/x"}})

    async def check() -> dict[str, dict[tuple[Any, ...], Any]]:
        rec = await live.store.read("Patient", rid)
        assert rec is not None
        stored = await _stored_rows(live, "Patient", rid)
        # exactly the rows a full extraction of the stored content gives
        assert {k: set(v) for k, v in stored.items()} == _as_sets(
            live.search.rows("Patient", rid, fhirjson.loads(rec.content)))
        return stored

    first = await check()
    changed = {**pat, "id": rid, "telecom": [{"system": "phone", "value": "+998902222222"}],
               "name": [{"family": "Yusupova", "given": ["Malika"]}],
               "identifier": [*pat["identifier"], {"system": "https://dpm.uz/identifier/passport-local",
                                                   "value": "AA7654321"}]}
    await later_rows()
    await crud.update(live, ctx(), "Patient", rid, changed)
    second = await check()
    kept = [(k, r) for k, rows in second.items() for r in rows if r in first.get(k, {})]
    assert any(k == "date" and r[2] == "birthdate" for k, r in kept)
    assert all(second[k][r] == first[k][r] for k, r in kept)  # unchanged rows were not written again
    assert {r[2] for k, rows in second.items() for r in rows if r not in first.get(k, {})} == {
        "phone", "telecom", "identifier"}
    assert not any(r[2] == "given" and r[3] == "zarina" for r in second["string"])
    hits = await search_type(live, ctx(), "Patient", [("phone", "+998902222222")])
    assert ids(hits) == {rid}
    assert ids(await search_type(live, ctx(), "Patient", [("given", "zarina")])) == set()
    assert ids(await search_type(live, ctx(), "Patient", [("identifier", "AA7654321")])) == {rid}

    # Rows written by another extraction (an older version, other parameters): all of them are replaced.
    async with live.store.begin() as tx:
        conn = await tx.connection() if not live.store.is_sqlite else tx.conn
        await conn.execute(update(resources).where(resources.c.type == "Patient", resources.c.id == rid)
                           .values(index_key=12345))
    await later_rows()
    await crud.update(live, ctx(), "Patient", rid, {**changed, "gender": "other"})
    third = await check()
    assert all(third[k][r] != second[k][r] for k in third for r in third[k] if r in second.get(k, {}))
    async with live.store.read_conn() as conn:
        key = (await conn.execute(select_key(rid))).scalar_one()
    assert key == live.search.index_key("Patient") != 12345

    # A deleted resource has no rows; writing it again indexes it in full.
    await crud.delete(live, ctx(), "Patient", rid)
    assert await _stored_rows(live, "Patient", rid) == {}
    await crud.update(live, ctx(), "Patient", rid, changed)
    await check()


def select_key(rid: str) -> Any:
    from sqlalchemy import select

    from dhp.store.schema import resources

    return select(resources.c.index_key).where(resources.c.type == "Patient", resources.c.id == rid)


async def test_rows_with_infinite_values_are_replaced_whole(live: Server) -> None:
    from dhp.interactions import crud

    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": Decimal("1e400"), "unit": "mg"}}
    rid = (await crud.create(live, ctx(), "Observation", obs)).rec.id
    for value in (Decimal("2.5"), Decimal("1e400"), Decimal("-1e400")):
        await crud.update(live, ctx(), "Observation", rid, {**obs, "id": rid, "valueQuantity": {"value": value}})
        rec = await live.store.read("Observation", rid)
        assert rec is not None
        stored = await _stored_rows(live, "Observation", rid)
        assert {k: set(v) for k, v in stored.items()} == _as_sets(
            live.search.rows("Observation", rid, fhirjson.loads(rec.content)))


async def test_the_index_key_names_the_extraction(live: Server, registry: Any) -> None:
    other = SearchEngine(registry)  # another process, same parameters: same key
    assert other.index_key("Patient") == live.search.index_key("Patient") is not None
    assert live.search.index_key("Observation") not in (None, live.search.index_key("Patient"))
    assert live.search.index_key("Bundle") is None  # documents index their entries with every type's parameters


_ALTERNATIVES: dict[str, dict[str, list[Any]]] = {
    "Patient": {
        "gender": [None, "male", "female"],
        "birthDate": [None, "1990-01-02", "1990", "2001-12-31"],
        "telecom": [None, [{"system": "phone", "value": "+998901111111"}],
                    [{"system": "phone", "value": "+998902222222"}, {"system": "email", "value": "a@b.uz"}]],
        "name": [None, [{"family": "Yusupova", "given": ["Malika"]}],
                 [{"family": "Yusupova", "given": ["Malika", "Zarina"], "prefix": ["Dr"]}, {"text": "Юсупова"}]],
        "address": [None, [{"city": "17150085", "state": "1727", "country": "UZ"}],
                    [{"city": "17150086", "district": "1727220", "line": ["Navoiy 5"]}]],
        "identifier": [None, [{"system": "https://dpm.uz/identifier/national-unique-id", "value": "41111111111111"}],
                       [{"system": "https://dpm.uz/identifier/passport-local", "value": "AA7654321"}]],
        "meta": [None, {"tag": [{"system": "http://dhp.test/tag", "code": "vip"}]},
                 {"profile": ["https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient"]}],
        "extension": [None, [{"url": "https://dhp.uz/fhir/core/StructureDefinition/patient-nationality",
                              "valueCodeableConcept": {"coding": [{"code": "UZ"}]}}]],
        "managingOrganization": [None, {"reference": "Organization/org"}, {"reference": "Organization/x"}],
        "deceasedBoolean": [None, True, False],
        "deceasedDateTime": [None, "2024-03-01"],
    },
    "Observation": {
        "code": [{"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                 {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "BP"}],
        "valueQuantity": [None, {"value": Decimal("72"), "unit": "/min", "system": "http://unitsofmeasure.org",
                                 "code": "/min"}, {"value": Decimal("1.50"), "unit": "mg"}],
        "valueString": [None, "positive"],
        "valueCodeableConcept": [None, {"coding": [{"system": "http://snomed.info/sct", "code": "10828004"}]}],
        "component": [None, [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                              "valueQuantity": {"value": Decimal("120"), "unit": "mm[Hg]"}}],
                      [{"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                        "valueQuantity": {"value": Decimal("80"), "unit": "mm[Hg]"}}]],
        "effectiveDateTime": [None, "2024-01-01T09:00:00Z", "2024-02"],
        "effectivePeriod": [None, {"start": "2024-01-01", "end": "2024-01-03"}],
        "subject": [None, {"reference": "Patient/a"}, {"reference": "Group/g"}],
        "status": ["final", "amended"],
    },
}


async def test_updates_keep_index_rows_equal_to_a_full_extraction(live: Server) -> None:
    """Random sequences of changes (choice types switched, elements added, changed, removed): after each
    update, the stored rows are exactly those a full extraction of the new content gives."""
    import random

    from dhp.interactions import crud

    rnd = random.Random(20261122)
    for rtype, alternatives in _ALTERNATIVES.items():
        def pick(base: dict[str, Any], keys: list[str], alternatives: dict[str, list[Any]] = alternatives,
                 ) -> dict[str, Any]:
            out = dict(base)
            for k in keys:
                v = rnd.choice(alternatives[k])
                if v is None:
                    out.pop(k, None)
                else:
                    out[k] = v
            return out

        res = pick({"resourceType": rtype}, list(alternatives))
        rid = (await crud.create(live, ctx(), rtype, res)).rec.id
        for _ in range(40):
            res = pick({**res, "id": rid}, rnd.sample(list(alternatives), rnd.randint(1, 3)))
            res.pop("meta", None) if rnd.random() < 0.2 else None
            await crud.update(live, ctx(), rtype, rid, res)
            rec = await live.store.read(rtype, rid)
            assert rec is not None
            stored = await _stored_rows(live, rtype, rid)
            expected = _as_sets(live.search.rows(rtype, rid, fhirjson.loads(rec.content)))
            assert {k: set(v) for k, v in stored.items()} == expected, res


async def test_reindexing_while_updates_go_on_leaves_exact_rows(live: Server) -> None:
    """A full reindex reads each batch in the transaction that rewrites its rows (locked on PostgreSQL) and
    marks them; an update that read a resource before (PostgreSQL: its one statement's snapshot may predate the
    batch's commit) refuses itself and is retried, so no rows of an older version survive."""
    import asyncio
    import random

    from dhp.interactions import crud

    rnd = random.Random(7)
    rids = []
    for i in range(12):
        res = {"resourceType": "Patient", "gender": "male", "name": [{"family": f"Reidx{i}"}],
               "telecom": [{"system": "phone", "value": f"+9989000{i:05d}"}]}
        rids.append((await crud.create(live, ctx(), "Patient", res)).rec.id)
    done = False

    async def updater(k: int) -> None:
        for n in range(25):
            rid = rnd.choice(rids)
            res = {"resourceType": "Patient", "id": rid, "gender": rnd.choice(["male", "female", "other"]),
                   "name": [{"family": f"Reidx{k}x{n}"}],
                   "telecom": [{"system": "phone", "value": f"+99891{k}{n:06d}"}]}
            await crud.update(live, ctx(), "Patient", rid, res)
            await asyncio.sleep(0)

    async def reindexer() -> None:
        while not done:
            await live.search.reindex(live.store, ["Patient"], batch=4)

    task = asyncio.ensure_future(reindexer())
    await asyncio.gather(*(updater(k) for k in range(3)))
    done = True
    await task
    for rid in rids:
        rec = await live.store.read("Patient", rid)
        assert rec is not None
        stored = await _stored_rows(live, "Patient", rid)
        expected = _as_sets(live.search.rows("Patient", rid, fhirjson.loads(rec.content)))
        assert {k: set(v) for k, v in stored.items()} == expected, rid
