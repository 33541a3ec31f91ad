"""Server options that change REST behaviour (DHP_REQUIRE_IF_MATCH, DHP_BASE_URL) and JSON edge cases."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhp import fhirjson

FJ = {"Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def national(start_server: Callable[..., Any], new_db_url: Callable[[str], str]) -> Any:
    """Configured as the national platform: If-Match mandatory, a public base URL behind a proxy."""
    return start_server(DHP_DATABASE_URL=new_db_url("sqlite"), DHP_AUTH="off", DHP_VALIDATION="off",
                        DHP_PACKAGE_IMPORT="none", DHP_REQUIRE_IF_MATCH="true",
                        DHP_BASE_URL="https://dhp.example.uz/fhir")


def test_if_match_required(national: Any) -> None:
    with httpx.Client(base_url=national.fhir, headers=FJ, timeout=60) as c:
        p = c.post("/Patient", content=b'{"resourceType":"Patient","active":true}').json()
        url = f"/Patient/{p['id']}"
        r = c.put(url, content=orjson.dumps({**p, "active": False}))
        assert r.status_code == 412
        assert "Version is mismatch" in r.json()["issue"][0]["diagnostics"]
        ops = b'[{"op":"replace","path":"/active","value":false}]'
        assert c.patch(url, content=ops, headers={"Content-Type": "application/json-patch+json"}).status_code == 412
        ok = c.put(url, content=orjson.dumps({**p, "active": False}), headers={"If-Match": 'W/"1"'})
        assert ok.status_code == 200
        # creating through PUT needs no version
        assert c.put("/Patient/new-one", content=b'{"resourceType":"Patient","id":"new-one"}').status_code == 201


def test_public_base_url_in_location_and_links(national: Any) -> None:
    with httpx.Client(base_url=national.fhir, headers=FJ, timeout=60) as c:
        r = c.post("/Patient", content=b'{"resourceType":"Patient"}')
        assert r.headers["Location"].startswith("https://dhp.example.uz/fhir/Patient/")
        h = c.get("/Patient/_history", params={"_count": 1}).json()
        assert h["entry"][0]["fullUrl"].startswith("https://dhp.example.uz/fhir/Patient/")
        assert all(link["url"].startswith("https://dhp.example.uz/fhir/") for link in h["link"])
        assert c.get("/metadata").json()["implementation"]["url"] == "https://dhp.example.uz/fhir"


def test_head_and_unknown_operation(national: Any) -> None:
    with httpx.Client(base_url=national.fhir, headers=FJ, timeout=60) as c:
        p = c.post("/Patient", content=b'{"resourceType":"Patient"}').json()
        h = c.head(f"/Patient/{p['id']}")
        assert h.status_code == 200 and h.headers["ETag"] == 'W/"1"' and h.content == b""
        r = c.get("/Patient/$no-such-operation")
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
        assert c.get("/no/such/deep/path/here").status_code == 404


_decimal_text = st.from_regex(r"-?(0|[1-9][0-9]{0,12})\.[0-9]{1,10}([eE][+-]?[0-9]{1,3})?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(_decimal_text, min_size=1, max_size=5))
def test_decimal_text_round_trips(values: list[str]) -> None:
    raw = '{"resourceType":"Observation","component":[' + ",".join(
        f'{{"valueQuantity":{{"value":{v}}}}}' for v in values) + "]}"
    parsed = fhirjson.loads(raw)
    assert all(isinstance(c["valueQuantity"]["value"], Decimal) for c in parsed["component"])
    assert fhirjson.dumps(parsed).decode() == raw


def test_huge_integers_round_trip() -> None:
    raw = '{"a":99999999999999999999,"b":-9223372036854775809,"c":18446744073709551615}'
    assert fhirjson.dumps(fhirjson.loads(raw)).decode() == raw


def test_json_rejects_non_json_numbers() -> None:
    for bad in ('{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": 01}', "{'a': 1}"):
        with pytest.raises(fhirjson.JSONError):
            fhirjson.loads(bad)
        with pytest.raises(fhirjson.JSONError):
            fhirjson.loads(bad.encode())
