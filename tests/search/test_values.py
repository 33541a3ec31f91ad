"""Value conversions and extraction: dates as ranges, number precision, normalisation, FHIRPath paths."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhp.instants import MAX_US, DateError, date_range
from dhp.search import SearchEngine
from dhp.search.extract import compile_expression
from dhp.search.parse import split_escaped, unescape
from dhp.search.values import norm, number_range


def us(y: int, mo: int = 1, d: int = 1, h: int = 0, mi: int = 0, s: int = 0) -> int:
    from datetime import datetime

    return int(datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()) * 1_000_000


@pytest.mark.parametrize(("text", "lo", "hi"), [
    ("2024", us(2024), us(2025) - 1),
    ("2024-02", us(2024, 2), us(2024, 3) - 1),
    ("2023-02", us(2023, 2), us(2023, 3) - 1),
    ("2024-02-29", us(2024, 2, 29), us(2024, 3, 1) - 1),
    ("2024-03-05T10:00", us(2024, 3, 5, 10), us(2024, 3, 5, 10, 1) - 1),
    ("2024-03-05T10:00:30Z", us(2024, 3, 5, 10, 0, 30), us(2024, 3, 5, 10, 0, 31) - 1),
    ("2024-03-05T10:00:30+05:00", us(2024, 3, 5, 5, 0, 30), us(2024, 3, 5, 5, 0, 31) - 1),
    ("2024-03-05T10:00:30.5Z", us(2024, 3, 5, 10, 0, 30) + 500_000, us(2024, 3, 5, 10, 0, 30) + 599_999),
    ("9999", us(9999), MAX_US),
    ("2016-12-31T23:59:60Z", us(2017), us(2017) + 999_999),  # a leap second, as FHIR's pattern allows
    # past the ends of datetime's range (it overflows there): still ranges
    ("9999-12", us(9999, 12), us(9999, 12) + 31 * 86_400_000_000 - 1),
    ("9999-12-31T23:00:00-05:00", us(9999, 12, 31, 23) + 5 * 3_600_000_000,
     us(9999, 12, 31, 23) + 5 * 3_600_000_000 + 999_999),
    ("0001-01-01T00:00+01:00", us(1) - 3_600_000_000, us(1) - 3_600_000_000 + 59_999_999),
])
def test_date_is_a_range(text: str, lo: int, hi: int) -> None:
    assert date_range(text) == (lo, hi)


@given(st.datetimes(min_value=__import__("datetime").datetime(1, 1, 2),
                    max_value=__import__("datetime").datetime(9999, 12, 30)),
       st.one_of(st.none(), st.integers(-14 * 60, 14 * 60)))
def test_instants_agree_with_datetime(dt: Any, offset: int | None) -> None:
    """Integer date arithmetic against Python's datetime, to the microsecond, with and without a zone."""
    from datetime import datetime, timedelta

    text = f"{dt.year:04d}-{dt:%m-%dT%H:%M:%S}.{dt.microsecond:06d}"  # %Y leaves years below 1000 unpadded
    if offset is None:
        text += "Z"
    else:
        text += f"{'+' if offset >= 0 else '-'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    expected = (dt - datetime(1970, 1, 1)) // timedelta(microseconds=1) - (offset or 0) * 60_000_000
    assert date_range(text) == (expected, expected)


@pytest.mark.parametrize("bad", ["", "24", "2024-13", "2024-02-30", "2024-01-01T25:00", "yesterday",
                                 "2024-01-01T10:00:00+5", "2024/01/01"])
def test_bad_dates(bad: str) -> None:
    with pytest.raises(DateError):
        date_range(bad)


@given(st.datetimes(min_value=__import__("datetime").datetime(1900, 1, 1),
                    max_value=__import__("datetime").datetime(2200, 1, 1)))
def test_every_precision_contains_the_finer_ones(dt: Any) -> None:
    text = dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    inner = date_range(text)
    for cut in (4, 7, 10, 16):
        lo, hi = date_range(text[:cut])
        assert lo <= inner[0] <= inner[1] <= hi


@pytest.mark.parametrize(("text", "lo", "hi"), [
    ("100", 99.5, 100.5), ("100.0", 99.95, 100.05), ("1e2", 50.0, 150.0), ("0.35", 0.345, 0.355),
    ("-2", -2.5, -1.5),
])
def test_number_precision(text: str, lo: float, hi: float) -> None:
    got = number_range(text)
    assert got[0] == pytest.approx(lo) and got[1] == pytest.approx(hi)


@pytest.mark.parametrize(("a", "b"), [
    ("Oʻzbekiston", "o'zbekiston"), ("O‘ZBEKISTON", "o'zbekiston"), ("Gʼulom", "g'ulom"),
    ("José Núñez", "jose nunez"), ("КАРИМОВ", "каримов"), ("Йўлдош", "йўлдош"), ("Ёқубов", "ёқубов"),
])
def test_normalisation(a: str, b: str) -> None:
    assert norm(a) == b


def test_escaping() -> None:
    assert split_escaped(r"a\,b,c", ",") == [r"a\,b", "c"]
    assert unescape(r"a\,b\$c\|d\\e") == r"a,b$c|d\e"
    assert split_escaped(r"http://x|a\|b", "|") == ["http://x", r"a\|b"]


@pytest.mark.parametrize(("expr", "resource", "expected"), [
    ("Patient.name.family", {"resourceType": "Patient", "name": [{"family": "A"}, {"family": "B"}]}, ["A", "B"]),
    ("Observation.value.ofType(Quantity)", {"resourceType": "Observation", "valueQuantity": {"value": 1}},
     [{"value": 1}]),
    ("Observation.value.ofType(Quantity)", {"resourceType": "Observation", "valueString": "x"}, []),
    ("(Observation.value as CodeableConcept)", {"resourceType": "Observation", "valueCodeableConcept": {"text": "t"}},
     [{"text": "t"}]),
    ("Observation.effective", {"resourceType": "Observation", "effectivePeriod": {"start": "2020"}},
     [{"start": "2020"}]),
    ("Observation.subject.where(resolve() is Patient)",
     {"resourceType": "Observation", "subject": {"reference": "Group/1"}}, []),
    ("Observation.subject.where(resolve() is Patient)",
     {"resourceType": "Observation", "subject": {"reference": "http://x/fhir/Patient/1"}},
     [{"reference": "http://x/fhir/Patient/1"}]),
    ("Patient.telecom.where(system='phone') | Person.telecom", {"resourceType": "Patient", "telecom": [
        {"system": "phone", "value": "1"}, {"system": "email", "value": "e"}]}, [{"system": "phone", "value": "1"}]),
    ("Patient.extension('http://x/e').value",
     {"resourceType": "Patient", "extension": [{"url": "http://x/e", "valueString": "v"},
                                               {"url": "http://x/o", "valueString": "o"}]}, ["v"]),
    ("Patient.deceased.exists() and Patient.deceased != false",
     {"resourceType": "Patient", "deceasedDateTime": "2020"}, [True]),
    ("Patient.deceased.exists() and Patient.deceased != false",
     {"resourceType": "Patient", "deceasedBoolean": False}, []),
    # interpreted (not a plain path): fhirpathpy, same answer
    ("Patient.name.where(family.startsWith('K')).family",
     {"resourceType": "Patient", "name": [{"family": "Karimov"}, {"family": "Nazarov"}]}, ["Karimov"]),
])
def test_expressions(registry: Any, expr: str, resource: dict[str, Any], expected: list[Any]) -> None:
    fn = compile_expression(expr, resource["resourceType"], registry.resource_types())
    assert fn is not None
    assert fn(resource) == expected


def test_every_r5_parameter_compiles(registry: Any) -> None:
    eng = SearchEngine(registry)
    n = 0
    for rtype in sorted(registry.resource_types()):
        for kind, code, ex in eng.extractors(rtype):
            assert kind and code and ex.root is not None
            n += 1
    assert n > 1500  # every resource type's parameters, incl. the common ones


def test_extracted_rows(registry: Any) -> None:
    eng = SearchEngine(registry)
    pat = {"resourceType": "Patient", "id": "p", "meta": {"versionId": "1"},
           "identifier": [{"system": "urn:s", "value": "1", "type": {"coding": [{"system": "urn:t", "code": "NI"}]}}],
           "name": [{"family": "Toʻxtayev", "given": ["Oʻtkir"]}], "birthDate": "1990-02",
           "managingOrganization": {"reference": "Organization/o1", "identifier": {"system": "urn:o", "value": "9"}}}
    rows = eng.rows("Patient", "p", pat)
    assert ("Patient", "p", "identifier", "urn:s", "1", None, "urn:t", "NI") in rows["token"]
    assert ("Patient", "p", "family", "to'xtayev", "Toʻxtayev") in rows["string"]
    assert ("Patient", "p", "birthdate", *date_range("1990-02")) in rows["date"]
    assert ("Patient", "p", "organization", "Organization", "o1", None, None, "urn:o", "9") in rows["reference"]


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=12),
                       st.sampled_from(["", "2024-03-05", "2024-13", "male", "Patient/p1", "http://x/y|2"]))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["system", "code", "value", "display", "text", "coding", "family", "given",
                                     "city", "reference", "type", "identifier", "start", "end", "unit",
                                     "low", "high", "concept", "currency", "line"]), inner, max_size=4)),
    max_leaves=12)


@given(_json)
def test_one_value_converts_as_in_a_list(value: Any) -> None:
    """The converters answer one value on a shortcut (most parameters find exactly one); a list holding it
    twice takes the general path and, its rows deduplicated, must give the same rows."""
    from dhp.search.extract import (
        date_rows,
        number_rows,
        quantity_rows,
        reference_rows,
        string_rows,
        token_rows,
        uri_rows,
    )

    names = frozenset({"Patient", "Observation"})
    for convert in (token_rows, string_rows, date_rows, uri_rows, number_rows, quantity_rows,
                    lambda vs: reference_rows(vs, names), lambda vs: string_rows(vs, frozenset({"family"}))):
        try:
            one = convert([value])
        except (AttributeError, TypeError, ValueError) as e:  # a malformed value fails both ways alike
            with pytest.raises(type(e)):
                convert([value, value])
            continue
        assert one == convert([value, value])
