"""Generated extraction (``dhp.search.compiled``) gives exactly the general loop's rows, on any resource."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhp.search import SearchEngine

TYPES = ["Patient", "Observation", "Encounter", "Condition", "Practitioner", "Organization", "MedicationRequest",
         "DiagnosticReport", "Immunization", "Location", "AllergyIntolerance", "Procedure", "ServiceRequest",
         "DocumentReference", "Composition", "CodeSystem", "ValueSet", "Coverage", "Appointment", "Consent"]

_CC = {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "HR"}
_REALISTIC = [
    "male", "final", "2024-03-05", "2024-03-05T10:00:00Z", "2024-13", "", "Toʻxtayev", "http://x/y|2", True, False,
    0, 12.5, _CC, [_CC, {"text": "only text"}], {"coding": [{"code": "x"}, None]},
    {"reference": "Patient/p1"}, {"reference": "http://h/fhir/Encounter/e1/_history/2", "display": "E"},
    {"identifier": {"system": "urn:s", "value": "9"}, "type": "Patient"}, {"reference": "#c1"},
    {"concept": _CC}, {"reference": {"reference": "Condition/c1"}},
    [{"family": "Karimov", "given": ["Aziz", "A"], "text": "Aziz Karimov"}], {"family": ["odd"]},
    {"start": "2024", "end": "2025-01"}, {"start": "bad"}, {"event": ["2024-01-01"], "repeat": {
        "boundsPeriod": {"start": "2024-02"}}},
    {"value": 1.5, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}, {"value": "1.5"},
    {"low": {"value": 1, "unit": "a"}, "high": {"value": 2}}, {"value": 3, "currency": "UZS"},
    [{"system": "urn:s", "value": "1", "type": {"coding": [{"system": "urn:t", "code": "NI"}]}}],
    {"system": "phone", "value": "+998901234567"}, {"system": "email", "value": "a@b.uz", "use": "work"},
    {"use": "home", "city": "Toshkent", "line": ["a", "b"], "district": "1727220", "country": "UZ"},
    [{"code": _CC, "valueQuantity": {"value": 80, "code": "/min"}},
     {"code": {"coding": [{"code": "x"}]}, "valueCodeableConcept": _CC}],
    {"url": "http://e/x", "valueString": "v"}, [None, "a", None], [[["deep"]]], {"latitude": 41.3, "longitude": 69.2},
]
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8),
                  st.sampled_from(_REALISTIC))
_json = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["system", "code", "value", "display", "text", "coding", "family", "given",
                                     "city", "reference", "type", "identifier", "start", "end", "unit", "low",
                                     "high", "concept", "line", "url", "valueQuantity", "valueString", "source",
                                     "sourceUri", "sourceReference"]),
                    inner, max_size=4)), max_leaves=10)


@pytest.fixture(scope="module")
def engine(registry: Any) -> SearchEngine:
    return SearchEngine(registry)


def _element_names(engine: SearchEngine, rtype: str) -> list[str]:
    """The property names the type's parameters read (typed ones too: ``valueQuantity``), and a few none do."""
    names = {"id", "meta", "text", "extension", "contained"}
    for _kind, _code, ex in engine.extractors(rtype):
        for probes in [ex.probes, *(ex.component_probes or [])]:
            if probes is not None:
                names |= probes[0] | probes[1]
    return sorted(names)


@st.composite
def _resources(draw: st.DrawFn, engine: SearchEngine) -> dict[str, Any]:
    rtype = draw(st.sampled_from(TYPES))
    names = _element_names(engine, rtype)
    picked = draw(st.lists(st.sampled_from(names), min_size=1, max_size=8, unique=True))
    resource: dict[str, Any] = {"resourceType": rtype}
    for name in picked:
        resource[name] = draw(_json)
    return resource


def _same_as_loop(engine: SearchEngine, resource: dict[str, Any]) -> None:
    rtype = resource["resourceType"]
    fast = engine.rows(rtype, "r1", resource)
    # Named codes take the general loop; all of them, all of its rows.
    every = {code for _kind, code, _ex in engine.extractors(rtype)}
    assert fast == engine.rows(rtype, "r1", resource, codes=every)
    run = engine._plan(rtype).chosen.get(frozenset(resource))
    assert run is not None and run.fast is not None  # the generated function answered


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_rows_equal_the_loops(engine: SearchEngine, data: st.DataObject) -> None:
    _same_as_loop(engine, data.draw(_resources(engine)))




@pytest.mark.parametrize("resource", [
    # a choice element's typed name under a plain one (``meta.source`` reads ``sourceUri`` as _child does)
    {"resourceType": "Patient", "meta": {"sourceUri": "http://src/1"}},
    {"resourceType": "Patient", "meta": [{"source": "http://src/1"}, None, {"source": ["a", None]}]},
    # nulls inside lists, a list where one value is expected, a typed value under its plain name
    {"resourceType": "Observation", "status": ["final", None], "valueQuantity": None,
     "value": {"value": 1, "unit": "x"}, "effective": "2024-01-01"},
    {"resourceType": "Observation", "effectiveDateTime": ["2024", None, "bad"], "code": [None, {"text": "t"}]},
    {"resourceType": "Encounter", "actualPeriod": {"start": "2024-01-01", "end": "9999-12"}},
])
def test_edge_shapes_equal_the_loop(engine: SearchEngine, resource: dict[str, Any]) -> None:
    _same_as_loop(engine, resource)


def test_every_filtered_path_equals_the_loop(engine: SearchEngine) -> None:
    """Paths with filters (``where(system='phone')``, ``extension('url')``, ``where(resolve() is T)``) on every
    resource type, each on a resource built so that the path finds something."""
    seen = 0
    for rtype in sorted(engine.params.resource_types):
        for _kind, _code, ex in engine.extractors(rtype):
            steps = getattr(ex.root, "steps", None)
            if not steps or not any(k in ("where_eq", "ext", "whereref", "first") for part in steps for k, _ in part):
                continue
            for part in steps:
                props = _build(part)
                if props:
                    _same_as_loop(engine, {"resourceType": rtype, **props})
                    seen += 1
    assert seen > 50


def _build(part: Any) -> dict[str, Any]:
    """Properties that the steps of ``part`` find a value through (plus neighbours a filter leaves out)."""
    leaf: Any = {"system": "urn:s", "code": "c1", "value": "v1", "reference": "Patient/p1", "valueString": "s",
                 "valueReference": {"reference": "ResearchStudy/rs1"}, "valueCodeableConcept": {"text": "t"}}
    node: Any = leaf
    for kind, arg in reversed(part):
        name, _, rest = arg.partition("|")
        if kind == "child":
            node = {name: node if isinstance(node, list) else [node]}
        elif kind == "typed":
            node = {name + rest[0].upper() + rest[1:]: node}
        elif kind == "where_eq":
            items = node if isinstance(node, list) else [node]
            node = [*[{**i, name: rest} for i in items if isinstance(i, dict)],
                    *[{**i, name: rest + "-not"} for i in items if isinstance(i, dict)]]
        elif kind == "ext":
            items = node if isinstance(node, list) else [node]
            node = {"extension": [*[{**i, "url": arg} for i in items if isinstance(i, dict)],
                                  {"url": arg + "-other", "valueString": "no"}]}
        elif kind == "whereref":
            node = [{"reference": f"{arg}/r9"}, {"reference": "Other/r8"}]
        elif kind == "first":
            items = node if isinstance(node, list) else [node]
            node = [*items, {"extra": "second"}]
        elif kind == "self":
            continue
    return node if isinstance(node, dict) and "resourceType" not in node else {}


def test_shared_first_steps_and_memo(engine: SearchEngine) -> None:
    """Parameters reading one element share its walk (``address.*``), and rows of parameters with equal paths
    are made once; each still gets its own code."""
    p = {"resourceType": "Patient", "address": [{"city": "Toshkent", "state": "1727", "country": "UZ"}],
         "name": [{"family": "Karimov", "given": ["Aziz"]}], "gender": "male", "birthDate": "1990-05-17"}
    rows = engine.rows("Patient", "p", p)
    assert ("Patient", "p", "address-city", "toshkent", "Toshkent") in rows["string"]
    assert ("Patient", "p", "address-state", "1727", "1727") in rows["string"]
    assert ("Patient", "p", "family", "karimov", "Karimov") in rows["string"]
    assert ("Patient", "p", "gender", None, "male", None, None, None) in rows["token"]
    assert [r[2] for r in rows["date"]] == ["birthdate"]
    source = engine._plan("Patient").chosen[frozenset(p)].fast.source  # type: ignore[union-attr]
    assert source.count("r.get('address')") == 1


def test_a_failing_value_falls_back_to_the_loop(engine: SearchEngine, caplog: pytest.LogCaptureFixture) -> None:
    """A value an extractor cannot read fails that parameter alone (the loop logs and skips it), as before."""
    # A dict as a logical reference's type: reference_rows looks it up among the type names and fails
    # (unhashable); the other parameters still get their rows.
    o = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "urn:s", "code": "x"}]},
         "subject": {"identifier": {"value": "9"}, "type": {"bad": 1}}}
    rows = engine.rows("Observation", "o", o)
    assert ("Observation", "o", "status", None, "final", None, None, None) in rows["token"]
    assert ("Observation", "o", "code", "urn:s", "x", None, None, None) in rows["token"]
    assert "reference" not in rows
    assert "indexing Observation/o subject failed" in caplog.text
