"""With auth on, the document pages need a bearer token like the FHIR API (and honour its scopes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from dhp import fhirjson
from tests.documents import fixtures as fx
from tests.documents.conftest import FJ, document_env


def test_document_pages_need_a_token(start_server: Callable[..., Any], new_db_url: Callable[[str], str],
                                     doc_keys: dict[str, Any]) -> None:
    env = {**document_env(new_db_url("sqlite"), doc_keys), "DHP_AUTH": "on"}
    srv = start_server(**env)
    admin = srv.admin_client
    assert admin and admin.get("client_id")
    tok = httpx.post(f"{srv.base}/oauth/token", data={"grant_type": "client_credentials",
                                                       "client_id": admin["client_id"],
                                                       "client_secret": admin["client_secret"]}, timeout=60)
    assert tok.status_code == 200, tok.text
    auth = {"Authorization": f"Bearer {tok.json()['access_token']}"}
    r = httpx.post(f"{srv.fhir}/Bundle", content=fhirjson.dumps(fx.form_096()), timeout=120,
                   headers={**auth, "Content-Type": FJ})
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    for path in (f"/documents/{bid}", f"/documents/{bid}/original"):
        anon = httpx.get(srv.base + path, timeout=60)
        assert anon.status_code == 401
        assert anon.json()["resourceType"] == "OperationOutcome"
        assert httpx.get(srv.base + path, headers=auth, timeout=60).status_code == 200
    assert httpx.get(f"{srv.fhir}/Bundle/{bid}", headers={"Accept": "text/html"}, timeout=60).status_code == 401
