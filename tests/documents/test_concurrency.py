"""Racing submissions: one winner per Bundle.identifier and per replaced version."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from dhp import fhirjson
from tests.documents import fixtures as fx
from tests.documents.test_lifecycle import version_of


def _race(doc_server: Any, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    def send(b: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=doc_server.fhir, timeout=120,
                          headers={"Content-Type": "application/fhir+json"}) as c:
            return c.post("/Bundle", content=fhirjson.dumps(b))

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_identical_documents_racing(doc_server: Any, client: httpx.Client) -> None:
    b = fx.form_096()
    rs = _race(doc_server, [b, b, b])
    assert sorted(r.status_code for r in rs) == [200, 200, 201], [r.text[:200] for r in rs]
    assert len({r.json()["id"] for r in rs}) == 1


def test_two_versions_replacing_the_same_one(doc_server: Any, client: httpx.Client) -> None:
    v1 = fx.form_003()
    r = client.post("/Bundle", content=fhirjson.dumps(v1))
    assert r.status_code == 201
    a = version_of(v1, "amended")
    b = version_of(v1, "amended")
    b["identifier"]["value"] += "-b"
    rs = _race(doc_server, [a, b])
    assert sorted(r.status_code for r in rs) == [201, 409], [r.text[:300] for r in rs]
    ident = v1["entry"][0]["resource"]["identifier"][0]
    current = client.get("/DocumentReference", params={"identifier": f"{ident['system']}|{ident['value']}",
                                                       "status": "current"}).json()
    assert len(current.get("entry") or []) == 1
