"""REST interactions over real HTTP on both backends: read, vread, create, update, patch, delete, history,
capabilities, conditional headers, Prefer, _format/_summary/_elements, and every error status."""

from __future__ import annotations

import datetime
import email.utils
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

FJ = "application/fhir+json"
H = {"Content-Type": FJ, "Accept": FJ}


@pytest.fixture(scope="module")
def client(server: Any) -> httpx.Client:
    with httpx.Client(base_url=server.fhir, headers=H, timeout=60) as c:
        yield c


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "active": True, "name": [{"family": "Karimov", "given": ["Aziz"]}],
            "birthDate": "1990-05-17", **extra}


def create(client: httpx.Client, res: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/{res['resourceType']}", content=orjson.dumps(res))
    assert r.status_code == 201, r.text
    return r.json()


def assert_outcome(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and body["issue"][0]["severity"] in ("error", "fatal")
    if code:
        assert body["issue"][0]["code"] == code
    return body


# ------------------------------------------------------------------ create / read / vread


def test_create_assigns_id_meta_and_headers(client: httpx.Client) -> None:
    r = client.post("/Patient", content=orjson.dumps(patient(id="client-chosen")))
    assert r.status_code == 201
    body = r.json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Location"].endswith(f"/fhir/Patient/{body['id']}/_history/1")
    assert "Last-Modified" in r.headers
    assert r.headers["content-type"].startswith("application/fhir+json")


def test_assigned_ids_are_time_ordered_uuid7(client: httpx.Client) -> None:
    """Server-assigned ids (create and transaction POST entries) are UUIDv7: their first 48 bits are the
    creation time in ms, so ids taken later sort after earlier ones (B-trees keyed by id then append)."""
    from datetime import datetime

    ids = []
    for _ in range(3):
        ids.append(create(client, patient())["id"])
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": patient(), "request": {"method": "POST", "url": "Patient"}}]}
    r = client.post("", content=orjson.dumps(tx))
    assert r.status_code == 200, r.text
    ids.append(r.json()["entry"][0]["response"]["location"].split("/")[1])
    for rid in ids:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 7 and u.variant == uuid.RFC_4122
    stamps = [int(rid.replace("-", "")[:12], 16) for rid in ids]
    assert stamps == sorted(stamps)
    last = client.get(f"/Patient/{ids[-1]}").json()["meta"]["lastUpdated"]
    updated_ms = int(datetime.fromisoformat(last.replace("Z", "+00:00")).timestamp() * 1000)
    assert abs(stamps[-1] - updated_ms) < 5000
    assert len(set(ids)) == len(ids)


def test_read_serves_stored_bytes(client: httpx.Client) -> None:
    created = create(client, patient())
    r = client.get(f"/Patient/{created['id']}")
    assert r.status_code == 200
    assert r.json() == created
    assert r.headers["ETag"] == 'W/"1"'


def test_decimals_keep_precision_everywhere(client: httpx.Client) -> None:
    raw = (b'{"resourceType":"Observation","status":"final","code":{"text":"w"},'
           b'"valueQuantity":{"value":1.50,"unit":"kg"},"component":[{"code":{"text":"x"},'
           b'"valueQuantity":{"value":3.0}},{"code":{"text":"y"},"valueQuantity":{"value":0.000100}}]}')
    r = client.post("/Observation", content=raw)
    assert r.status_code == 201
    for text in (r.text, client.get(f"/Observation/{r.json()['id']}").text):
        assert '"value":1.50' in text and '"value":3.0' in text and '"value":0.000100' in text
    oid = r.json()["id"]
    # update keeps them
    upd = r.text.replace('"value":1.50', '"value":2.250')
    r2 = client.put(f"/Observation/{oid}", content=upd)
    assert r2.status_code == 200 and '"value":2.250' in r2.text and '"value":3.0' in r2.text
    # patch keeps untouched ones
    ops = b'[{"op":"replace","path":"/status","value":"amended"}]'
    r3 = client.patch(f"/Observation/{oid}", content=ops, headers={"Content-Type": "application/json-patch+json"})
    assert r3.status_code == 200 and '"value":2.250' in r3.text and '"value":0.000100' in r3.text
    # history and vread keep them
    h = client.get(f"/Observation/{oid}/_history")
    assert '"value":1.50' in h.text and '"value":2.250' in h.text
    assert '"value":1.50' in client.get(f"/Observation/{oid}/_history/1").text
    # pretty printing keeps them too
    assert '"value": 2.250' in client.get(f"/Observation/{oid}?_pretty=true").text


def test_vread_and_unknown_version(client: httpx.Client) -> None:
    p = create(client, patient())
    r = client.put(f"/Patient/{p['id']}", content=orjson.dumps({**p, "active": False}))
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    v1 = client.get(f"/Patient/{p['id']}/_history/1")
    assert v1.status_code == 200 and v1.json()["active"] is True
    assert client.get(f"/Patient/{p['id']}/_history/2").json()["active"] is False
    assert_outcome(client.get(f"/Patient/{p['id']}/_history/9"), 404, "not-found")
    assert_outcome(client.get(f"/Patient/{p['id']}/_history/abc"), 404)


def test_unknown_id_and_type(client: httpx.Client) -> None:
    assert_outcome(client.get("/Patient/does-not-exist"), 404, "not-found")
    assert_outcome(client.get("/Foo/1"), 404)
    assert_outcome(client.post("/Foo", content=b'{"resourceType":"Foo"}'), 404)


# ------------------------------------------------------------------ update


def test_update_create_on_update_and_versions(client: httpx.Client) -> None:
    rid = "p-" + uuid.uuid4().hex[:10]
    r = client.put(f"/Patient/{rid}", content=orjson.dumps(patient(id=rid)))
    assert r.status_code == 201 and r.json()["id"] == rid and r.headers["ETag"] == 'W/"1"'
    r = client.put(f"/Patient/{rid}", content=orjson.dumps(patient(id=rid, gender="male")))
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'


def test_update_if_match(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    ok = client.put(url, content=orjson.dumps(p), headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = client.put(url, content=orjson.dumps(p), headers={"If-Match": 'W/"1"'})
    body = assert_outcome(stale, 412, "conflict")
    assert "mismatch" in body["issue"][0]["diagnostics"]
    assert_outcome(client.put(url, content=orjson.dumps(p), headers={"If-Match": "garbage"}), 400)


def test_update_id_rules(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    assert_outcome(client.put(url, content=orjson.dumps({**p, "id": "other"})), 400)
    body = dict(p)
    del body["id"]
    assert_outcome(client.put(url, content=orjson.dumps(body)), 400)
    assert_outcome(client.put(url, content=orjson.dumps({**p, "resourceType": "Observation"})), 400)
    assert_outcome(client.put("/Patient/bad id!", content=orjson.dumps({**p, "id": "bad id!"})), 400)
    # nothing was written by the failed attempts
    assert client.get(url).json()["meta"]["versionId"] == "1"


# ------------------------------------------------------------------ patch


def test_json_patch(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    ops = [{"op": "replace", "path": "/active", "value": False},
           {"op": "add", "path": "/name/0/given/-", "value": "Bekovich"},
           {"op": "test", "path": "/birthDate", "value": "1990-05-17"}]
    r = client.patch(url, content=orjson.dumps(ops), headers={"Content-Type": "application/json-patch+json",
                                                               "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.json()["active"] is False and r.json()["name"][0]["given"] == ["Aziz", "Bekovich"]
    assert r.json()["meta"]["versionId"] == "2"
    failing = [{"op": "test", "path": "/birthDate", "value": "2000-01-01"}]
    assert_outcome(client.patch(url, content=orjson.dumps(failing),
                                headers={"Content-Type": "application/json-patch+json"}), 422)
    assert_outcome(client.patch(url, content=b'[{"op":"jump","path":"/a"}]',
                                headers={"Content-Type": "application/json-patch+json"}), 400)
    change_id = [{"op": "replace", "path": "/id", "value": "x"}]
    assert_outcome(client.patch(url, content=orjson.dumps(change_id),
                                headers={"Content-Type": "application/json-patch+json"}), 422)
    assert client.get(url).json()["meta"]["versionId"] == "2"


def test_fhirpath_patch(client: httpx.Client) -> None:
    p = create(client, patient(telecom=[{"system": "phone", "value": "+998901234567"}]))
    url = f"/Patient/{p['id']}"

    def op(kind: str, path: str, **parts: Any) -> dict[str, Any]:
        items = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
        for k, v in parts.items():
            items.append({"name": k, **v})
        return {"name": "operation", "part": items}

    params = {"resourceType": "Parameters", "parameter": [
        op("replace", "Patient.birthDate", value={"valueDate": "1991-01-02"}),
        op("add", "Patient", name={"valueString": "gender"}, value={"valueCode": "male"}),
        op("delete", "Patient.telecom[0]"),
        op("insert", "Patient.name", index={"valueInteger": 0},
           value={"valueHumanName": {"family": "Каримов"}}),
    ]}
    r = client.patch(url, content=orjson.dumps(params))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["birthDate"] == "1991-01-02"
    assert body["gender"] == "male"
    assert "telecom" not in body
    assert body["name"][0]["family"] == "Каримов" and body["name"][1]["family"] == "Karimov"
    bad = {"resourceType": "Parameters", "parameter": [op("replace", "Patient.name", value={"valueString": "x"})]}
    assert_outcome(client.patch(url, content=orjson.dumps(bad)), 422)
    assert_outcome(client.patch(url, content=orjson.dumps({"resourceType": "Patient"})), 400)


# ------------------------------------------------------------------ delete


def test_delete_is_soft_and_gone(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    assert client.delete(url).status_code == 204
    assert_outcome(client.get(url), 410)
    assert client.delete(url).status_code == 204  # idempotent
    h = client.get(f"{url}/_history").json()
    assert [e["request"]["method"] for e in h["entry"]] == ["DELETE", "POST"]
    assert client.get(f"{url}/_history/1").status_code == 200
    # re-creating through update brings it back as a new version
    r = client.put(url, content=orjson.dumps(p))
    assert r.status_code == 201 and r.json()["meta"]["versionId"] == "3"
    assert_outcome(client.delete("/Patient/never-existed"), 404)


# ------------------------------------------------------------------ history


def test_history_levels_paging_since_at(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    for i in range(4):
        time.sleep(0.002)  # lastUpdated has millisecond precision: _since/_at below need distinct instants
        client.put(url, content=orjson.dumps({**p, "birthDate": f"199{i}-01-01"}))
    h = client.get(f"{url}/_history", params={"_count": 2}).json()
    assert h["type"] == "history" and h["total"] == 5
    assert [e["resource"]["meta"]["versionId"] for e in h["entry"]] == ["5", "4"]
    nxt = next(link["url"] for link in h["link"] if link["relation"] == "next")
    # a concurrent write does not shift the pages of a running paging session
    time.sleep(0.002)
    client.put(url, content=orjson.dumps({**p, "birthDate": "2001-01-01"}))
    page2 = client.get(nxt).json()
    assert [e["resource"]["meta"]["versionId"] for e in page2["entry"]] == ["3", "2"]
    v3_time = client.get(f"{url}/_history/3").json()["meta"]["lastUpdated"]
    since = client.get(f"{url}/_history", params={"_since": v3_time}).json()
    assert sorted(int(e["resource"]["meta"]["versionId"]) for e in since["entry"]) == [3, 4, 5, 6]
    at = client.get(f"{url}/_history", params={"_at": v3_time}).json()
    assert [e["resource"]["meta"]["versionId"] for e in at["entry"]] == ["3"]
    typ = client.get("/Patient/_history", params={"_count": 3}).json()
    assert typ["total"] >= 6 and len(typ["entry"]) == 3
    assert all(e["fullUrl"].split("/fhir/")[1].startswith("Patient/") for e in typ["entry"])
    system = client.get("/_history", params={"_count": 1}).json()
    assert system["type"] == "history" and len(system["entry"]) == 1
    # the calendar's ends are instants like any (datetime overflows there)
    for edge in ("9999", "9999-12", "9999-12-31", "9999-12-31T23:00:00-05:00"):
        r = client.get(f"{url}/_history", params={"_since": edge})
        assert r.status_code == 200 and not r.json().get("entry"), r.text
        r = client.get(f"{url}/_history", params={"_at": edge})
        assert [e["resource"]["meta"]["versionId"] for e in r.json()["entry"]] == ["6"], r.text
    r = client.get(f"{url}/_history", params={"_since": "0001-01-01T00:00:00+01:00"})
    assert r.status_code == 200 and len(r.json()["entry"]) == 6
    assert not client.get("/_history", params={"_at": "0001-01-01T00:00:00+01:00"}).json().get("entry")
    assert_outcome(client.get(f"{url}/_history", params={"_since": "yesterday"}), 400)
    assert_outcome(client.get(f"{url}/_history", params={"_since": "2024-02-30"}), 400)
    assert_outcome(client.get(f"{url}/_history", params={"_count": "many"}), 400)
    assert_outcome(client.get("/Patient/nope/_history"), 404)


# ------------------------------------------------------------------ conditional headers and Prefer


def test_if_none_match_and_if_modified_since(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    assert client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": 'W/"7"'}).status_code == 200
    lm = client.get(url).headers["Last-Modified"]
    assert client.get(url, headers={"If-Modified-Since": lm}).status_code == 304
    assert client.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200
    # RFC 9110: "*" matches any current representation; tags that are not ours match nothing; a value that is
    # not an HTTP-date is ignored; HTTP dates are GMT even in the forms that carry no zone.
    assert client.get(url, headers={"If-None-Match": "*"}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"abc", W/"1"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"abc"'}).status_code == 200
    assert client.get(url, headers={"If-Modified-Since": "yesterday"}).status_code == 200
    assert client.get(url, headers={"If-Modified-Since": "Fri, 31 Dec 99999 23:59:59 GMT"}).status_code == 200
    assert client.get(url, headers={"If-Modified-Since": "Fri Dec 31 23:59:59 9999"}).status_code == 304
    stamp = email.utils.parsedate_to_datetime(lm)
    just_before = (stamp - datetime.timedelta(seconds=1)).strftime("%a %b %d %H:%M:%S %Y")  # asctime form
    assert client.get(url, headers={"If-Modified-Since": just_before}).status_code == 200
    assert client.get(url, headers={"If-Modified-Since": stamp.strftime("%a %b %d %H:%M:%S %Y")}).status_code == 304


def test_conditional_create_by_id(client: httpx.Client) -> None:
    p = create(client, patient())
    r = client.post("/Patient", content=orjson.dumps(patient()), headers={"If-None-Exist": f"_id={p['id']}"})
    assert r.status_code == 200 and r.json()["id"] == p["id"]


def test_prefer_return(client: httpx.Client) -> None:
    r = client.post("/Patient", content=orjson.dumps(patient()), headers={"Prefer": "return=minimal"})
    assert r.status_code == 201 and r.content == b"" and "Location" in r.headers
    r = client.post("/Patient", content=orjson.dumps(patient()), headers={"Prefer": "return=OperationOutcome"})
    assert r.status_code == 201 and r.json()["resourceType"] == "OperationOutcome"
    assert_outcome(client.post("/Patient", content=orjson.dumps(patient()), headers={"Prefer": "return=all"}), 400)


def test_format_pretty_summary_elements(client: httpx.Client) -> None:
    p = create(client, patient(text={"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">A</div>"}))
    url = f"/Patient/{p['id']}"
    assert client.get(url, params={"_format": "json"}).status_code == 200
    assert client.get(url, params={"_format": "application/fhir+json"}).status_code == 200
    assert "\n  " in client.get(url, params={"_pretty": "true"}).text
    s = client.get(url, params={"_summary": "true"}).json()
    assert "name" in s and "text" not in s and any(t["code"] == "SUBSETTED" for t in s["meta"]["tag"])
    d = client.get(url, params={"_summary": "data"}).json()
    assert "text" not in d and "name" in d
    t = client.get(url, params={"_summary": "text"}).json()
    assert "text" in t and "name" not in t
    e = client.get(url, params={"_elements": "birthDate"}).json()
    assert e["birthDate"] == "1990-05-17" and "name" not in e and e["id"] == p["id"]
    assert_outcome(client.get(url, params={"_summary": "maybe"}), 400)


# ------------------------------------------------------------------ negotiation and errors


def test_media_type_errors(client: httpx.Client) -> None:
    p = create(client, patient())
    url = f"/Patient/{p['id']}"
    assert_outcome(client.get(url, headers={"Accept": "application/fhir+xml"}), 406)
    assert_outcome(client.get(url, params={"_format": "xml"}), 406)
    assert client.get(url, headers={"Accept": "application/json"}).status_code == 200
    assert client.get(url, headers={"Accept": "*/*"}).status_code == 200
    # A header sent twice: the first one counts, as in Starlette's own lookups.
    assert_outcome(client.get(url, headers=[("Accept", "application/fhir+xml"), ("Accept", FJ)]), 406)
    assert client.get(url, headers=[("Accept", FJ), ("Accept", "application/fhir+xml")]).status_code == 200
    assert_outcome(client.post("/Patient", content=b"<Patient/>", headers={"Content-Type": "application/xml"}), 415)
    assert_outcome(client.post("/Patient", content=orjson.dumps(patient()),
                               headers={"Content-Type": "application/fhir+json; charset=latin-1"}), 415)


def test_body_errors(client: httpx.Client) -> None:
    assert_outcome(client.post("/Patient", content=b'{"resourceType": "Patient", '), 400, "structure")
    assert_outcome(client.post("/Patient", content=b"[1, 2]"), 400)
    assert_outcome(client.post("/Patient", content=b'{"name": []}'), 400)
    assert_outcome(client.post("/Patient", content=b""), 400)
    assert_outcome(client.post("/Patient", content=b'{"resourceType":"Patient","x":NaN}'), 400)
    assert_outcome(client.post("/Patient", content=b"\xff\xfe{}"), 400)
    assert_outcome(client.post("/Patient", content=orjson.dumps({"resourceType": "Observation"})), 400)


def test_method_not_allowed(client: httpx.Client) -> None:
    assert_outcome(client.delete("/metadata"), 405)
    p = create(client, patient())
    assert_outcome(client.post(f"/Patient/{p['id']}", content=orjson.dumps(p)), 405)
    assert_outcome(client.put("/Patient/_history", content=b"{}"), 405)


def test_body_too_large(server: Any) -> None:
    limit = server.server.settings.max_body_bytes
    with httpx.Client(base_url=server.fhir, headers=H, timeout=60) as c:
        big = b'{"resourceType":"Patient","id":"x","text":{"div":"' + b"a" * (limit + 10) + b'"}}'
        assert_outcome(c.post("/Patient", content=big), 413)

        def gen():  # no Content-Length: the limit still holds while streaming
            yield big

        assert_outcome(c.post("/Patient", content=gen()), 413)


def test_capability_statement(client: httpx.Client) -> None:
    cs = client.get("/metadata").json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "5.0.0"
    assert cs["kind"] == "instance"
    types = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert len(types) > 140 and "Patient" in types
    codes = {i["code"] for i in types["Patient"]["interaction"]}
    assert {"read", "vread", "create", "update", "patch", "delete", "history-instance"} <= codes
    assert "https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient" in types["Patient"]["supportedProfile"]
    assert {i["code"] for i in cs["rest"][0]["interaction"]} >= {"transaction", "batch", "history-system"}
    assert cs["instantiates"] == ["https://dhp.uz/fhir/core/CapabilityStatement/DHPCapabilityStatement"]
    # The search parameters a search can use, with their definitions; none the server reports as unsupported.
    params = {p["name"]: p for p in types["Patient"]["searchParam"]}
    assert params["identifier"] == {"name": "identifier", "type": "token",
                                    "definition": "http://hl7.org/fhir/SearchParameter/Patient-identifier"}
    assert params["birthdate"]["type"] == "date" and params["general-practitioner"]["type"] == "reference"
    assert {"_id", "_lastUpdated", "_tag", "_profile", "_has", "_list"} <= params.keys()
    assert not {"_text", "_content", "_filter", "_query", "_in", "_type"} & params.keys()
    assert params["age"]["type"] == "number"  # whole years from birthDate (dhp.search.params, years_since)
    near = {p["name"]: p for p in types["Location"]["searchParam"]}["near"]
    assert near["type"] == "special"


def test_package_conformance_resources_are_readable(client: httpx.Client) -> None:
    sd = client.get("/StructureDefinition/uz-core-patient")
    assert sd.status_code == 200
    assert sd.json()["url"] == "https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient"
    vs = client.get("/ValueSet/mahalla-vs")
    assert vs.status_code == 200 and vs.json()["resourceType"] == "ValueSet"


def test_negative_zero_keeps_its_sign(client: httpx.Client) -> None:
    """``-0`` is a valid FHIR decimal and keeps its sign byte for byte (it was parsed as the integer 0)."""
    raw = b'{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":-0}}'
    r = client.post("/Observation", content=raw)
    assert r.status_code == 201, r.text
    oid = r.json()["id"]
    ops = b'[{"op":"replace","path":"/status","value":"amended"}]'
    patched = client.patch(f"/Observation/{oid}", content=ops,
                           headers={"Content-Type": "application/json-patch+json"})
    assert patched.status_code == 200
    for text in (r.text, client.get(f"/Observation/{oid}").text, patched.text):
        assert '"value":-0}' in text, text


def test_a_failing_reload_neither_fails_the_committed_write_nor_later_requests(server: Any) -> None:
    """A consumer of conformance changes that raises (a bug) is logged: the write that made the change is
    committed and answered as such, the other consumers reload, and later requests work."""
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("consumer bug")

    listeners = server.server.registry.listeners
    listeners.insert(0, broken)
    try:
        with httpx.Client(base_url=server.fhir, headers={"Content-Type": "application/fhir+json"}) as c:
            vs = {"resourceType": "ValueSet", "url": f"http://dhp.test/fhir/ValueSet/{uuid.uuid4().hex}",
                  "status": "active", "compose": {"include": [{"system": "http://dhp.test/cs", "concept": [
                      {"code": "a"}]}]}}
            r = c.post("/ValueSet", content=orjson.dumps(vs))
            assert r.status_code == 201, r.text
            assert calls  # the broken consumer did run
            exp = c.get("/ValueSet/$expand", params={"url": vs["url"]})
            assert exp.status_code == 200, exp.text  # the terminology consumer reloaded after it
            assert [x["code"] for x in exp.json()["expansion"]["contains"]] == ["a"]
            assert c.get("/Patient").status_code == 200
    finally:
        listeners.remove(broken)
