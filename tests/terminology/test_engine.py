"""The terminology engine in-process, against the real DHP, THO and FHIR core packages."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dhp.conformance import Registry
from dhp.errors import FHIRError
from dhp.terminology import Options, RenderOptions, Terminology
from dhp.terminology.text import language_list, normalize, parse_accept_language, words
from tests.terminology.conftest import CS, VS

ADDRESS_USE = "http://hl7.org/fhir/address-use"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
POSITION = CS + "position-and-profession-cs"


def _designation(concept: dict[str, Any], lang: str) -> str:
    return next(d["value"] for d in concept["designation"] if d.get("language") == lang)


def _concept(cs: dict[str, Any], code: str) -> dict[str, Any]:
    return next(c for c in cs["concept"] if c["code"] == code)


def _param(params: dict[str, Any], name: str) -> Any:
    for p in params["parameter"]:
        if p["name"] == name:
            return next((v for k, v in p.items() if k.startswith("value")), p.get("part"))
    return None


def _props(params: dict[str, Any], code: str) -> list[Any]:
    out = []
    for p in params["parameter"]:
        if p["name"] == "property":
            parts = {x["name"]: next(v for k, v in x.items() if k.startswith("value")) for x in p["part"]}
            if parts["code"] == code:
                out.append(parts.get("value"))
    return out


def _expand(term: Terminology, vs: dict[str, Any] | str, **kw: Any) -> dict[str, Any]:
    opts = kw.pop("opts", Options())
    kw.setdefault("max_expansion", 100_000)
    return term.expand(vs, RenderOptions(**kw), opts)


def _codes(expansion: dict[str, Any]) -> list[str]:
    return [c["code"] for c in expansion["expansion"].get("contains", [])]


# ---------------------------------------------------------------- text and languages


def test_uzbek_apostrophe_variants_normalise_alike() -> None:
    assert normalize("Qoʻrgʻontepa") == normalize("Qo'rg'ontepa") == normalize("Qo‘rg’ontepa") == "qorgontepa"
    assert words("Ilg'or MFY, (Toshkent)") == ["ilgor", "mfy", "toshkent"]
    assert normalize("Ёлка") == "елка"


def test_accept_language_order_and_display_language_wins() -> None:
    assert parse_accept_language("en;q=0.5, ru, uz;q=0.8, *;q=0.1") == ["ru", "uz", "en"]
    assert language_list(None, "ru-RU,en;q=0.4") == ("ru-ru", "ru", "en")
    assert language_list("uz", "ru") == ("uz",)
    assert language_list(None, None) == ()


# ---------------------------------------------------------------- lookup: displays, designations, supplements


@pytest.mark.parametrize("lang", ["ru", "en"])
def test_lookup_region_display_in_requested_language(term: Terminology, package_cs: Any, lang: str) -> None:
    states = package_cs(CS + "states-cs")
    tashkent = _concept(states, "1727")
    out = term.lookup(CS + "states-cs", "1727", langs=(lang,))
    assert _param(out, "display") == _designation(tashkent, lang)
    assert _param(out, "name") == states["title"]
    langs = {next(x["valueCode"] for x in p["part"] if x["name"] == "language")
             for p in out["parameter"] if p["name"] == "designation"}
    assert langs == {"ru", "en"}


def test_lookup_default_display_is_the_code_system_language(term: Terminology, package_cs: Any) -> None:
    regions = package_cs(CS + "regions-cs")
    first = regions["concept"][0]
    assert _param(term.lookup(CS + "regions-cs", first["code"]), "display") == first["display"]
    # An unknown language falls back to the code system's own display (Uzbek here).
    assert _param(term.lookup(CS + "regions-cs", first["code"], langs=("de",)), "display") == first["display"]


def test_supplement_gives_uzbek_and_russian_display_of_address_use_home(term: Terminology,
                                                                         package_cs: Any) -> None:
    supplement = package_cs(CS + "address-use-cs")
    home = _concept(supplement, "home")
    base_home = _concept(package_cs(ADDRESS_USE), "home")
    assert _param(term.lookup(ADDRESS_USE, "home", langs=("uz",)), "display") == _designation(home, "uz")
    assert _param(term.lookup(ADDRESS_USE, "home", langs=("ru",)), "display") == _designation(home, "ru")
    assert _param(term.lookup(ADDRESS_USE, "home", langs=("en",)), "display") == base_home["display"]
    # …and in expansions of value sets over the supplemented system.
    out = _expand(term, VS + "address-use-vs", langs=("uz",))
    shown = {c["code"]: c["display"] for c in out["expansion"]["contains"]}
    assert shown["home"] == _designation(home, "uz")
    assert shown["temp"] == _designation(_concept(supplement, "temp"), "uz")


def test_lookup_position_group_lists_its_children(term: Terminology, package_cs: Any) -> None:
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    group = codes[0]
    expected = [c for c in codes if c.startswith(group + ".")]
    out = term.lookup(POSITION, group)
    assert _props(out, "child") == expected
    assert _props(out, "parent") == []
    assert _props(term.lookup(POSITION, expected[1]), "parent") == [group]
    only = term.lookup(POSITION, group, properties=("parent",))
    assert _props(only, "child") == [] and _param(only, "designation") is None


def test_lookup_errors(term: Terminology) -> None:
    with pytest.raises(FHIRError) as e:
        term.lookup("http://loinc.org", "8867-4")
    assert e.value.status == 404
    with pytest.raises(FHIRError) as e:
        term.lookup(CS + "states-cs", "0000")
    assert e.value.status == 404 and "0000" in str(e.value)


def test_lookup_nested_hierarchy_and_abstract(term: Terminology, package_cs: Any) -> None:
    act = package_cs(ACTCODE)
    top = act["concept"][0]
    assert any(p["code"] == "notSelectable" and p["valueBoolean"] for p in top["property"])
    out = term.lookup(ACTCODE, top["code"])
    children = _props(out, "child")
    assert children and all(_props(term.lookup(ACTCODE, c), "parent") == [top["code"]] or
                            top["code"] in _props(term.lookup(ACTCODE, c), "parent") for c in children)
    assert _props(out, "notSelectable") == [True]


# ---------------------------------------------------------------- subsumes and hierarchy helpers


def test_subsumes_in_position_groups(term: Terminology, package_cs: Any) -> None:
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    group = codes[0]
    a, b = [c for c in codes if c.startswith(group + ".")][:2]
    assert term.subsumes(POSITION, group, a) == "subsumes"
    assert term.subsumes(POSITION, a, group) == "subsumed-by"
    assert term.subsumes(POSITION, a, b) == "not-subsumed"
    assert term.subsumes(POSITION, a, a) == "equivalent"
    with pytest.raises(FHIRError) as e:
        term.subsumes(POSITION, group, "nope")
    assert e.value.status == 404
    with pytest.raises(FHIRError):
        term.subsumes("http://snomed.info/sct", "1", "2")


def test_subsumed_by_and_ancestors_for_search(term: Terminology, package_cs: Any) -> None:
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    group = codes[0]
    members = {c for c in codes if c.startswith(group + ".")}
    assert term.subsumed_by(POSITION, group) == {group} | members
    child = sorted(members)[0]
    assert term.ancestors(POSITION, child) == {child, group}
    # Nested-concept hierarchy (THO v3 ActCode): every child's ancestors include its parent.
    kid = term.code_system(ACTCODE).concepts["_ActAccountCode"].children[0]
    assert "_ActAccountCode" in term.ancestors(ACTCODE, kid)
    assert kid in term.subsumed_by(ACTCODE, "_ActAccountCode")
    # Systems not loaded here: only the code itself.
    # systems not loaded here: the hierarchy is unknown, never a silent exact match
    assert term.subsumed_by("http://snomed.info/sct", "73211009") is None
    assert term.ancestors("http://loinc.org", "8867-4") is None


# ---------------------------------------------------------------- expansion


def test_full_expansions_of_the_big_dhp_value_sets(term: Terminology, package_cs: Any) -> None:
    for vs, cs in (("mahalla-vs", "mahalla-cs"), ("position-and-profession-vs", "position-and-profession-cs")):
        concepts = package_cs(CS + cs)["concept"]
        out = _expand(term, VS + vs)
        assert out["expansion"]["total"] == len(concepts)
        assert _codes(out) == [c["code"] for c in concepts]
        assert term.expand_codes(VS + vs) == {(CS + cs, c["code"]) for c in concepts}


def test_expansion_over_the_limit_needs_count(term: Terminology) -> None:
    with pytest.raises(FHIRError) as e:
        _expand(term, VS + "position-and-profession-vs", max_expansion=10_000)
    assert e.value.status == 422 and e.value.issues[0].code == "too-costly"
    page = _expand(term, VS + "position-and-profession-vs", max_expansion=10_000, count=20, offset=12_540)
    assert page["expansion"]["total"] == 12_551 and len(_codes(page)) == 11
    assert page["expansion"]["offset"] == 12_540


def test_paging_is_a_window_on_the_full_expansion(term: Terminology) -> None:
    full = _codes(_expand(term, VS + "mahalla-vs"))
    page = _expand(term, VS + "mahalla-vs", count=25, offset=100)
    assert _codes(page) == full[100:125]


@pytest.mark.parametrize(("lang", "query"), [("uz", "shifokor"), ("ru", "врач"), ("en", "doctor")])
def test_type_ahead_in_three_languages(term: Terminology, package_cs: Any, lang: str, query: str) -> None:
    concepts = package_cs(POSITION)["concept"]

    def hit(c: dict[str, Any]) -> bool:
        texts = [c["display"], *(d["value"] for d in c["designation"])]
        return any(w.startswith(normalize(query)) for t in texts for w in words(t))

    expected = [c for c in concepts if hit(c)]
    assert expected, query
    out = _expand(term, VS + "position-and-profession-vs", text_filter=query, count=20, langs=(lang,))
    assert out["expansion"]["total"] == len(expected)
    got = out["expansion"]["contains"]
    assert [c["code"] for c in got] == [c["code"] for c in expected[:20]]
    for c, src in zip(got, expected, strict=False):
        want = src["display"] if lang == "uz" else _designation(src, lang)
        assert c["display"] == want


def test_type_ahead_treats_uzbek_apostrophes_alike(term: Terminology, package_cs: Any) -> None:
    concepts = package_cs(CS + "mahalla-cs")["concept"]
    expected = [c["code"] for c in concepts if any(w.startswith("ilgor") for w in words(c["display"]))]
    assert expected
    for spelling in ("ilg'or", "ilgʻor", "Ilg‘or", "ILGOR"):
        out = _expand(term, VS + "mahalla-vs", text_filter=spelling, count=100)
        assert _codes(out) == expected, spelling
    # Several words: each must start a word.
    two = _expand(term, VS + "mahalla-vs", text_filter="ilg'or mfy", count=100)
    assert _codes(two) == [c for c in expected if any(
        w.startswith("mfy") for w in words(_concept({"concept": concepts}, c)["display"]))]
    assert _expand(term, VS + "mahalla-vs", text_filter="zzzzqqq", count=10)["expansion"]["total"] == 0


def test_type_ahead_matches_word_starts_only(term: Terminology) -> None:
    out = _expand(term, VS + "state-vs", text_filter="toshkent", langs=("uz",))
    assert sorted(_codes(out)) == ["1726", "1727"]
    assert _expand(term, VS + "state-vs", text_filter="oshkent")["expansion"]["total"] == 0
    ru = _expand(term, VS + "state-vs", text_filter="ташкент", langs=("ru",))
    assert sorted(_codes(ru)) == ["1726", "1727"]


def test_designations_and_properties_in_expansion(term: Terminology, package_cs: Any) -> None:
    out = _expand(term, VS + "state-vs", include_designations=True, count=1)
    first = out["expansion"]["contains"][0]
    src = package_cs(CS + "states-cs")["concept"][0]
    assert first["designation"] == src["designation"]
    only_ru = _expand(term, VS + "state-vs", designations=("ru",), count=1)["expansion"]["contains"][0]
    assert [d["language"] for d in only_ru["designation"]] == ["ru"]
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    props = _expand(term, VS + "position-and-profession-vs", properties=("parent",), count=2)
    second = props["expansion"]["contains"][1]
    assert second["property"] == [{"code": "parent", "valueCode": codes[0]}]
    assert props["expansion"]["property"][0]["code"] == "parent"


def test_nested_expansion_when_asked(term: Terminology) -> None:
    vs = {"resourceType": "ValueSet", "url": "urn:test:nest", "status": "active",
          "compose": {"include": [{"system": POSITION, "filter": [
              {"property": "concept", "op": "is-a", "value": "1112"}]}]}}
    flat = _expand(term, vs)
    nested = _expand(term, vs, exclude_nested=False)
    assert len(nested["expansion"]["contains"]) == 1
    root = nested["expansion"]["contains"][0]
    assert root["code"] == "1112"
    assert [c["code"] for c in root["contains"]] == _codes(flat)[1:]


def _vs(*include: dict[str, Any], exclude: list[dict[str, Any]] | None = None, **compose: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"include": list(include), **compose}
    if exclude:
        c["exclude"] = exclude
    return {"resourceType": "ValueSet", "status": "active", "compose": c}


def _f(prop: str, op: str, value: str) -> dict[str, Any]:
    return {"property": prop, "op": op, "value": value}


def test_compose_filters_on_hierarchy(term: Terminology, package_cs: Any) -> None:
    codes = [c["code"] for c in package_cs(POSITION)["concept"]]
    group = "1112"
    members = [c for c in codes if c.startswith(group + ".")]

    def run(*filters: dict[str, Any]) -> list[str]:
        return _codes(_expand(term, _vs({"system": POSITION, "filter": list(filters)})))

    assert run(_f("concept", "is-a", group)) == [group, *members]
    assert run(_f("concept", "descendent-of", group)) == members
    assert run(_f("concept", "descendent-leaf", group)) == members
    assert run(_f("concept", "child-of", group)) == members
    assert run(_f("concept", "generalizes", members[0])) == [group, members[0]]
    assert run(_f("parent", "=", group)) == members
    assert run(_f("concept", "is-a", group), _f("concept", "regex", r"1112\.1\d?")) == \
        [c for c in members if c in {"1112.1", *(f"1112.1{i}" for i in range(10))}]
    not_a = run(_f("concept", "is-not-a", group))
    assert len(not_a) == len(codes) - 1 - len(members) and group not in not_a
    assert run(_f("child", "exists", "true"), _f("concept", "in", f"{group},{members[0]}")) == [group]
    assert run(_f("concept", "in", f"{members[1]},{members[0]},nope")) == members[:2]
    not_in = run(_f("concept", "not-in", ",".join(codes[1:])))
    assert not_in == codes[:1]


def test_compose_filters_on_properties_of_a_tho_code_system(term: Terminology, package_cs: Any) -> None:
    act = package_cs(ACTCODE)
    flat: list[dict[str, Any]] = []

    def walk(cs: list[dict[str, Any]]) -> None:
        for c in cs:
            flat.append(c)
            walk(c.get("concept", []))

    walk(act["concept"])
    abstract = [c["code"] for c in flat
                if any(p["code"] == "notSelectable" and p.get("valueBoolean") for p in c.get("property", []))]
    got = _codes(_expand(term, _vs({"system": ACTCODE, "filter": [_f("notSelectable", "=", "true")]})))
    assert sorted(got) == sorted(abstract)
    retired = [c["code"] for c in flat
               if any(p["code"] == "status" and p.get("valueCode") == "retired" for p in c.get("property", []))]
    assert retired
    everything = _expand(term, _vs({"system": ACTCODE}))
    assert {c["code"] for c in everything["expansion"]["contains"] if c.get("inactive")} == set(retired)
    active = _expand(term, _vs({"system": ACTCODE}), opts=Options(active_only=True))
    assert not set(retired) & set(_codes(active))
    assert len(_codes(active)) == len(_codes(everything)) - len(set(retired))
    compose_inactive = _expand(term, _vs({"system": ACTCODE}, inactive=False))
    assert _codes(compose_inactive) == _codes(active)
    for_ui = _expand(term, _vs({"system": ACTCODE}), opts=Options(exclude_not_for_ui=True))
    assert not set(abstract) & set(_codes(for_ui))
    status = _codes(_expand(term, _vs({"system": ACTCODE, "filter": [_f("status", "exists", "true")]})))
    assert len(status) == sum(1 for c in flat if any(p["code"] == "status" for p in c.get("property", [])))


def test_compose_concept_lists_nested_value_sets_and_exclude(term: Terminology, package_cs: Any) -> None:
    states = [c["code"] for c in package_cs(CS + "states-cs")["concept"]]
    listed = _vs({"system": CS + "states-cs", "concept": [{"code": "1727"}, {"code": "1703", "display": "Andijon"},
                                                          {"code": "nope"}]})
    out = _expand(term, listed)
    assert _codes(out) == ["1727", "1703"]
    assert out["expansion"]["contains"][1]["display"] == "Andijon"
    assert any(p["name"] == "warning" and "nope" in p["valueString"] for p in out["expansion"]["parameter"])
    nested = _vs({"valueSet": [VS + "state-vs"]}, exclude=[{"system": CS + "states-cs", "concept": [
        {"code": "1727"}]}])
    assert _codes(_expand(term, nested)) == [c for c in states if c != "1727"]
    both = _vs({"system": CS + "states-cs", "valueSet": [VS + "state-vs"],
                "filter": [_f("concept", "in", "1703,1706")]})
    assert _codes(_expand(term, both)) == ["1703", "1706"]
    # Several "code =" filters in one include list codes (how loinc-birth-vs uses them).
    listed_by_filters = _vs({"system": CS + "states-cs", "filter": [_f("code", "=", "1727"), _f("code", "=", "1703")]})
    assert _codes(_expand(term, listed_by_filters)) == ["1703", "1727"]
    with pytest.raises(FHIRError) as e:
        _expand(term, _vs({"valueSet": ["https://example.org/ValueSet/missing"]}))
    assert e.value.status == 422
    with pytest.raises(FHIRError) as e:
        _expand(term, _vs({"system": CS + "states-cs", "filter": [_f("concept", "sounds-like", "x")]}))
    assert e.value.status == 422


def test_expansion_of_a_value_set_over_an_unloaded_system(term: Terminology) -> None:
    # loinc-birth-vs lists LOINC codes; LOINC is not loaded but the DHP supplement gives Uzbek names.
    out = _expand(term, "https://terminology.dhp.uz/ValueSet/loinc-birth-vs", langs=("uz",))
    vs = term.value_set("https://terminology.dhp.uz/ValueSet/loinc-birth-vs")
    assert vs is not None
    listed = [f["value"] for f in vs["compose"]["include"][0]["filter"]]
    assert _codes(out) == listed
    sup = term.registry.resolve("https://dhp.uz/fhir/integrations/CodeSystem/loinc-birth-supplement")
    first = next(c for c in sup["concept"] if c["code"] == listed[0])
    assert out["expansion"]["contains"][0]["display"] == _designation(first, "uz")
    # A whole unloaded system cannot be listed.
    with pytest.raises(FHIRError) as e:
        _expand(term, _vs({"system": "http://snomed.info/sct"}))
    assert e.value.status == 422
    assert term.expand_codes("http://snomed.info/sct?fhir_vs") is None


def test_unknown_value_set_is_404(term: Terminology) -> None:
    with pytest.raises(FHIRError) as e:
        _expand(term, VS + "no-such-vs")
    assert e.value.status == 404
    assert term.expand_codes(VS + "no-such-vs") is None


# ---------------------------------------------------------------- validate-code


def test_validate_code_in_code_system_and_value_set(term: Terminology, package_cs: Any) -> None:
    tashkent = _concept(package_cs(CS + "states-cs"), "1727")
    ok = term.validate_code(CS + "states-cs", "1727")
    assert ok.result is True and ok.display == tashkent["display"]
    assert term.validate_code(CS + "states-cs", "1727", VS + "state-vs").result is True
    bad = term.validate_code(CS + "states-cs", "9999", VS + "state-vs")
    assert bad.result is False and "9999" in bad.message
    # A real code from another DHP system is not in state-vs.
    other = term.validate_code(CS + "regions-cs", "1703202", VS + "state-vs")
    assert other.result is False
    # A code without a system is found in the value set.
    assert term.validate_code(None, "1727", VS + "state-vs").result is True
    assert term.validate_code(None, "male", "http://hl7.org/fhir/ValueSet/administrative-gender").result is True
    assert term.validate_code(None, "mail", "http://hl7.org/fhir/ValueSet/administrative-gender").result is False


def test_validate_code_display_in_any_language(term: Terminology, package_cs: Any) -> None:
    tashkent = _concept(package_cs(CS + "states-cs"), "1727")
    for shown in (tashkent["display"], _designation(tashkent, "ru"), _designation(tashkent, "en").upper()):
        assert term.validate_code(CS + "states-cs", "1727", display=shown).result is True, shown
    wrong = term.validate_code(CS + "states-cs", "1727", display="Samarqand viloyati")
    assert wrong.result is False and "Wrong display" in wrong.message
    # Supplement displays count, with any apostrophe spelling.
    uz = _designation(_concept(package_cs(CS + "address-use-cs"), "home"), "uz")
    assert term.validate_code(ADDRESS_USE, "home", display=uz.replace("'", "ʻ")).result is True


def test_validate_code_unknown_systems_are_never_true(term: Terminology) -> None:
    for system, code in (("http://loinc.org", "8867-4"), ("http://snomed.info/sct", "73211009"),
                         ("http://hl7.org/fhir/sid/icd-10", "C50.9")):
        check = term.validate_code(system, code)
        assert check.result is None and check.system_known is False
        assert "not known" in check.message
    # Listed in a value set, still not confirmed: the code itself cannot be checked.
    listed = term.validate_code("http://loinc.org", "9272-6", "https://terminology.dhp.uz/ValueSet/loinc-birth-vs")
    assert listed.result is None
    # Not listed in a closed value set: definitely not a member.
    assert term.validate_code("http://loinc.org", "0000-0",
                              "https://terminology.dhp.uz/ValueSet/loinc-birth-vs").result is False
    assert term.validate_code(CS + "states-cs", "1727", VS + "no-such-vs").result is None


def test_validate_ucum_units_by_grammar(term: Terminology) -> None:
    ucum = "http://unitsofmeasure.org"
    for unit in ("mg", "mm[Hg]", "kg/m2", "10*3/uL", "{beats}/min", "g/(kg.d)", "%"):
        assert term.validate_code(ucum, unit).result is True, unit
    for unit in ("foo", "mg//dL", "", "kg m2"):
        check = term.validate_code(ucum, unit)
        assert check.result is False, unit
    # A value set drawing on all of UCUM accepts valid units and rejects others.
    assert term.validate_code(ucum, "mmol/L", "http://hl7.org/fhir/ValueSet/ucum-units").result is True
    assert term.validate_code(ucum, "bogus", "http://hl7.org/fhir/ValueSet/ucum-units").result is False


def test_validate_code_abstract_and_inactive(term: Terminology) -> None:
    v = term.check(ACTCODE, "_ActAccountCode", abstract_ok=False)
    assert v.result is False and any(i.message_id == "code-abstract" for i in v.issues)
    assert term.check(ACTCODE, "_ActAccountCode").result is True
    retired = next(c for c in term.code_system(ACTCODE).order if c.inactive and not c.abstract)
    r = term.check(ACTCODE, retired.code)
    assert r.result is True and r.inactive and any(i.message_id == "code-inactive" for i in r.issues)
    vs = _vs({"system": ACTCODE}, inactive=False)
    assert term.check(ACTCODE, retired.code, vs).result is False


def test_validate_code_cache_answers_the_same(term: Terminology) -> None:
    first = term.validate_code(CS + "regions-cs", "1703202", VS + "regions-vs")
    again = term.validate_code(CS + "regions-cs", "1703202", VS + "regions-vs")
    assert first is again and first.result is True


def test_naming_system_aliases_resolve_to_the_canonical_url(term: Terminology, registry: Any) -> None:
    alias, url = next((k, v) for k, v in term._alias_map().items()
                      if k.startswith("urn:oid:") and term.code_system(v) is not None
                      and term.code_system(v).complete and term.code_system(v).order)
    code = term.code_system(url).order[0].code
    assert term.canonical_system(alias) == url
    assert term.validate_code(alias, code).result is True


# ---------------------------------------------------------------- translate


ICD10 = "http://hl7.org/fhir/sid/icd-10"
CANCER = CS + "cancer-types-cs"


def _icd_map() -> dict[str, Any]:
    return {
        "resourceType": "ConceptMap", "id": "icd10-to-dhp", "url": "https://dhp.uz/fhir/test/ConceptMap/icd10",
        "status": "active",
        "group": [{
            "source": ICD10, "target": CANCER,
            "element": [
                {"code": "C50.9", "target": [
                    {"code": "cancr0005.00021", "display": "BRCA1", "relationship": "related-to"},
                    {"code": "cancr0005.00022", "relationship": "source-is-narrower-than-target"}]},
                {"code": "Z00.0", "noMap": True},
            ],
            "unmapped": {"mode": "fixed", "code": "cancr0003.00000", "relationship": "related-to"},
        }],
    }


def test_translate_forward_reverse_and_unmapped(term: Terminology) -> None:
    cm = _icd_map()
    out = term.translate(ICD10, "C50.9", maps=[cm])
    assert _param(out, "result") is True
    matches = [p["part"] for p in out["parameter"] if p["name"] == "match"]
    got = [(next(x["valueCode"] for x in m if x["name"] == "relationship"),
            next(x["valueCoding"]["code"] for x in m if x["name"] == "concept")) for m in matches]
    assert got == [("related-to", "cancr0005.00021"), ("source-is-narrower-than-target", "cancr0005.00022")]
    back = term.translate(CANCER, "cancr0005.00022", maps=[cm], reverse=True)
    match = next(p["part"] for p in back["parameter"] if p["name"] == "match")
    assert next(x["valueCoding"] for x in match if x["name"] == "concept") == {"system": ICD10, "code": "C50.9"}
    assert next(x["valueCode"] for x in match if x["name"] == "relationship") == "source-is-broader-than-target"
    nomap = term.translate(ICD10, "Z00.0", maps=[cm])
    assert _param(nomap, "result") is False
    fixed = term.translate(ICD10, "A00", maps=[cm])
    assert _param(fixed, "result") is True
    assert "cancr0003.00000" in str(fixed)


def test_translate_with_package_maps(term: Terminology, package_cs: Any) -> None:
    cm = term.concept_map("http://hl7.org/fhir/ConceptMap/cm-address-use-v3")
    assert cm is not None
    el = next(e for e in cm["group"][0]["element"] if e["code"] == "home")
    out = term.translate(ADDRESS_USE, "home", target_system=cm["group"][0]["target"])
    codes = {m["valueCoding"]["code"] for p in out["parameter"] if p["name"] == "match"
             for m in p["part"] if m["name"] == "concept"}
    assert {t["code"] for t in el["target"]} <= codes
    assert _param(term.translate("http://loinc.org", "8867-4"), "result") is False


# ---------------------------------------------------------------- changes through the API overlay


def _overlay_cs() -> dict[str, Any]:
    return {"resourceType": "CodeSystem", "id": "clinic-kinds", "url": "https://dhp.uz/fhir/test/CodeSystem/kinds",
            "status": "active", "content": "complete", "language": "uz", "hierarchyMeaning": "is-a",
            "concept": [
                {"code": "poly", "display": "Poliklinika",
                 "designation": [{"language": "ru", "value": "Поликлиника"}],
                 "concept": [{"code": "poly-child", "display": "Bolalar poliklinikasi",
                              "designation": [{"language": "ru", "value": "Детская поликлиника"}]}]},
                {"code": "hosp", "display": "Shifoxona", "designation": [{"language": "ru", "value": "Больница"}]},
            ]}


def test_overlay_changes_take_effect_at_once(registry: Any) -> None:
    reg = Registry(registry.packages)
    term = Terminology(reg)
    cs = _overlay_cs()
    vs = {"resourceType": "ValueSet", "id": "kinds", "url": "https://dhp.uz/fhir/test/ValueSet/kinds",
          "status": "active", "compose": {"include": [{"system": cs["url"]}]}}
    assert term.validate_code(cs["url"], "poly").result is None
    states_index = term.code_system(CS + "states-cs")
    reg.set_overlay([cs, vs], 1)
    assert term.validate_code(cs["url"], "poly", vs["url"]).result is True
    assert term.subsumed_by(cs["url"], "poly") == {"poly", "poly-child"}
    assert _codes(_expand(term, vs["url"], langs=("ru",))) == ["poly", "poly-child", "hosp"]
    # Package indexes are kept across overlay changes that do not touch them.
    assert term.code_system(CS + "states-cs") is states_index
    changed = copy.deepcopy(cs)
    changed["concept"].append({"code": "lab", "display": "Laboratoriya"})
    reg.set_overlay([changed, vs], 2)
    assert _codes(_expand(term, vs["url"])) == ["poly", "poly-child", "hosp", "lab"]
    # A supplement written through the API changes displays of a package code system.
    sup = {"resourceType": "CodeSystem", "url": "https://dhp.uz/fhir/test/CodeSystem/states-kaa",
           "status": "active", "content": "supplement", "supplements": CS + "states-cs",
           "concept": [{"code": "1735", "designation": [{"language": "kaa", "value": "Qaraqalpaqstan"}]}]}
    reg.set_overlay([changed, vs, sup], 3)
    assert _param(term.lookup(CS + "states-cs", "1735", langs=("kaa",)), "display") == "Qaraqalpaqstan"
    reg.set_overlay([], 4)
    assert term.validate_code(cs["url"], "lab").result is None
    assert _param(term.lookup(CS + "states-cs", "1735", langs=("kaa",)), "display") != "Qaraqalpaqstan"


def test_check_definition_finds_terminology_errors(term: Terminology) -> None:
    cs = _overlay_cs()
    assert [i for i in term.check_definition(cs) if i.severity == "error"] == []
    dup = copy.deepcopy(cs)
    dup["concept"].append({"code": "hosp"})
    assert any(i.message_id == "cs-code-duplicate" for i in term.check_definition(dup))
    sup = {"resourceType": "CodeSystem", "content": "supplement", "supplements": CS + "states-cs",
           "concept": [{"code": "0000"}]}
    assert any(i.message_id == "cs-supplement-code-unknown" for i in term.check_definition(sup))
    vs = _vs({"system": CS + "states-cs", "concept": [{"code": "0000"}], "filter": [_f("concept", "~", "x")]})
    ids = {i.message_id for i in term.check_definition(vs)}
    assert {"vs-concept-and-filter", "vs-filter-op", "code-unknown"} <= ids
    cm = _icd_map()
    assert [i for i in term.check_definition(cm) if i.severity == "error"] == []
    cm["group"][0]["element"][0]["target"][0]["relationship"] = "equal"
    assert any(i.message_id == "cm-relationship" for i in term.check_definition(cm))
    ns = {"resourceType": "NamingSystem", "uniqueId": [{"type": "uri", "value": "a", "preferred": True},
                                                        {"type": "uri", "value": "b", "preferred": True}]}
    assert any(i.message_id == "ns-preferred" for i in term.check_definition(ns))


def test_terminology_capabilities_lists_loaded_code_systems(term: Terminology, registry: Any) -> None:
    caps = term.capabilities("https://example.org/fhir")
    assert caps["resourceType"] == "TerminologyCapabilities" and caps["kind"] == "instance"
    uris = {c["uri"]: c for c in caps["codeSystem"]}
    assert uris[CS + "mahalla-cs"]["content"] == "complete"
    assert CS + "address-use-cs" not in uris  # a supplement is not a code system
    assert "http://loinc.org" not in uris
    assert {p["name"] for p in caps["expansion"]["parameter"]} >= {"filter", "count", "displayLanguage"}
    # Every CodeSystem the engine can index is listed.
    assert all(u in uris for u in (CS + "states-cs", "http://hl7.org/fhir/address-use"))


def _all_words(concepts: list[dict[str, Any]]) -> list[str]:
    out: set[str] = set()
    for c in concepts:
        for t in (c["display"], *(d["value"] for d in c["designation"])):
            out.update(words(t))
    return sorted(out)


def test_type_ahead_equals_brute_force_for_random_prefixes(term: Terminology, package_cs: Any) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    concepts = package_cs(CS + "mahalla-cs")["concept"]
    vocab = _all_words(concepts)
    texts = [[w for t in (c["display"], *(d["value"] for d in c["designation"])) for w in words(t)] + [c["code"]]
             for c in concepts]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(vocab), st.integers(1, 6)), min_size=1, max_size=2))
    def check(picks: list[tuple[str, int]]) -> None:
        query = " ".join(w[:n] for w, n in picks)
        qs = words(query)
        expected = [c["code"] for c, ws in zip(concepts, texts, strict=True)
                    if all(any(w.startswith(q) for w in ws) for q in qs)]
        out = _expand(term, VS + "mahalla-vs", text_filter=query, count=10)
        assert out["expansion"]["total"] == len(expected)
        assert _codes(out) == expected[:10]

    check()
