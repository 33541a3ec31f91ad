"""Random input never produces a 5xx: every bad request is a 4xx OperationOutcome."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FJ = {"Content-Type": "application/fhir+json"}
TYPES = ["Patient", "Observation", "Bundle", "Parameters", "Basic", "Foo", "", 3, None]
KEYS = ["resourceType", "id", "meta", "name", "extension", "entry", "request", "method", "url", "resource",
        "fullUrl", "reference", "valueDecimal", "text", "div", "type", "parameter", "part", "op", "path", "value",
        "_birthDate", "birthDate", "contained", "ifMatch", "ifNoneExist", "subject", "code"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=20),
                      st.sampled_from(["Patient/x", "urn:uuid:1", "Patient?_id=1", "POST", "PUT", "DELETE",
                                       "GET", "transaction", "batch", "document", "Patient", "/a/0", "add",
                                       "replace", "remove", "Patient.name", "1990-13-45"]))
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=25)
resource = st.builds(lambda rt, body: {**body, "resourceType": rt} if rt is not None else body,
                     st.sampled_from(TYPES), st.dictionaries(st.sampled_from(KEYS), json_value, max_size=6))

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client(server: Any) -> httpx.Client:
    with httpx.Client(base_url=server.fhir, headers=FJ, timeout=60) as c:
        yield c


def _dumps(value: Any) -> bytes:
    # The standard library writes integers of any size, so huge numbers reach the server too.
    return json.dumps(value).encode()


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["resourceType"] == "OperationOutcome"


@SETTINGS
@given(body=resource)
def test_create_and_update_never_5xx(client: httpx.Client, body: dict[str, Any]) -> None:
    check(client.post("/Patient", content=_dumps(body)))
    check(client.put("/Patient/fuzz-1", content=_dumps(body)))
    check(client.post("", content=_dumps(body)))


@SETTINGS
@given(ops=json_value)
def test_patch_never_5xx(client: httpx.Client, ops: Any) -> None:
    client.put("/Patient/fuzz-p", content=b'{"resourceType":"Patient","id":"fuzz-p","active":true}')
    check(client.patch("/Patient/fuzz-p", content=_dumps(ops),
                       headers={"Content-Type": "application/json-patch+json"}))
    check(client.patch("/Patient/fuzz-p", content=_dumps(ops)))


@SETTINGS
@given(entries=st.lists(st.fixed_dictionaries(
    {"request": st.dictionaries(st.sampled_from(["method", "url", "ifMatch", "ifNoneExist"]), json_leaf,
                                max_size=4)},
    optional={"resource": resource, "fullUrl": json_leaf}), max_size=4), kind=st.sampled_from(["transaction", "batch"]))
def test_bundles_never_5xx(client: httpx.Client, entries: list[dict[str, Any]], kind: str) -> None:
    check(client.post("", content=_dumps({"resourceType": "Bundle", "type": kind, "entry": entries})))


def test_huge_numbers_are_a_4xx_or_kept(client: httpx.Client) -> None:
    body = b'{"resourceType":"Patient","active":true,"multipleBirthInteger":99999999999999999999}'
    r = client.post("/Patient", content=body)
    check(r)
    if r.status_code == 201:
        assert b"99999999999999999999" in client.get(f"/Patient/{r.json()['id']}").content


#: Valid instants at the calendar's ends, where datetime arithmetic overflows, and odd ones near them.
EDGE_DATES = ["9999", "9999-12", "9999-12-31", "9999-12-31T23:59:60Z", "9999-12-31T23:00:00-05:00", "0001",
              "0001-01-01T00:00:00+01:00", "0000-01-01", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.9999999Z"]


@SETTINGS
@given(path=st.text(alphabet="abcPatient/_$?&=%.-1", max_size=30),
       query=st.one_of(st.text(max_size=20), st.sampled_from(EDGE_DATES)))
def test_odd_urls_never_5xx(client: httpx.Client, path: str, query: str) -> None:
    # httpx refuses to send a relative path starting with "//"; the server sees such paths only from raw clients.
    path = path.lstrip("/")
    check(client.get("/" + path, params={"_summary": query, "_elements": query, "_count": query}))
    check(client.get("/Patient/_history", params={"_since": query, "_at": query, "_count": query}))


# Search: real parameters, modifiers and prefixes with arbitrary text (control characters included), so every
# parser and both databases' comparisons see odd values.
SEARCH_NAMES = ["identifier", "name", "family", "given", "birthdate", "gender", "address", "_id", "_lastUpdated",
                "general-practitioner", "organization", "_has:Observation:subject:code", "_tag", "_profile",
                "telecom", "phonetic", "link", "_text", "_content", "_list"]
# Plain names come up most often: a value only reaches the database when the name and modifier are valid.
SEARCH_MODS = ["", "", "", "", ":exact", ":contains", ":missing", ":not", ":text", ":of-type", ":below", ":above",
               ":identifier", ":Patient", ":in", ":code-text", ".identifier", ".name"]
search_value = st.one_of(
    st.text(max_size=20),
    st.builds(lambda p, t: p + t, st.sampled_from(["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"]),
              st.sampled_from(["2020", "2020-01-01T00:00:00Z", "1e400", "-0", "2020-13", "x|y", "|", "a,b",
                               "Patient/1", "http://x|1|mg", "\\,", "\x00", "%00", *EDGE_DATES])),
    st.text(alphabet="\x00\x01\t\n|,:$\\%*'\";-aZ09ёЎ", max_size=12))


@SETTINGS
@given(params=st.lists(st.tuples(st.builds(lambda n, m: n + m, st.sampled_from(SEARCH_NAMES),
                                            st.sampled_from(SEARCH_MODS)), search_value), min_size=1, max_size=2),
       rtype=st.sampled_from(["Patient", "Observation"]))
def test_searches_never_5xx(client: httpx.Client, params: list[tuple[str, str]], rtype: str) -> None:
    check(client.get(f"/{rtype}", params=params))
    check(client.post(f"/{rtype}/_search", data=dict(params),
                      headers={"Content-Type": "application/x-www-form-urlencoded"}))


# Resources whose indexed elements carry arbitrary text and numbers: what the index extracts must store.
odd_text = st.text(max_size=15)
indexed_patient = st.fixed_dictionaries({"resourceType": st.just("Patient")}, optional={
    "name": st.lists(st.fixed_dictionaries({}, optional={"family": odd_text, "given": st.lists(odd_text, max_size=2),
                                                         "text": odd_text}), max_size=2),
    "identifier": st.lists(st.fixed_dictionaries({}, optional={"system": odd_text, "value": odd_text}), max_size=2),
    "birthDate": st.sampled_from(["1990", "1990-05", "1990-05-17", "1990-02-30", "0000", "99999"]),
    "gender": odd_text,
    "address": st.lists(st.fixed_dictionaries({}, optional={"city": odd_text, "line": st.lists(odd_text, max_size=2)}),
                        max_size=2),
    "generalPractitioner": st.lists(st.fixed_dictionaries({}, optional={"reference": odd_text}), max_size=2),
    "telecom": st.lists(st.fixed_dictionaries({}, optional={"system": odd_text, "value": odd_text}), max_size=2)})


@SETTINGS
@given(body=indexed_patient)
def test_indexed_values_never_5xx(client: httpx.Client, body: dict[str, Any]) -> None:
    r = client.post("/Patient", content=_dumps(body))
    check(r)
    if r.status_code == 201:
        assert client.get(f"/Patient/{r.json()['id']}").status_code == 200
