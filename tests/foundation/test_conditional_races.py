"""Conditional creates racing for one identifier: at most one creates, on both backends and over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import httpx
import orjson

RACERS = 24


def _patient(ident: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:race", "value": ident}]}


def test_concurrent_if_none_exist_creates_once(server: Any) -> None:
    """POSTs with If-None-Exist on one identifier: one 201, the rest 200 with that resource (PostgreSQL's
    READ COMMITTED let every racer find no match and create its own: ~20 of 32 did)."""
    ident = uuid.uuid4().hex

    async def run() -> tuple[list[tuple[int, str]], int]:
        async with httpx.AsyncClient(base_url=server.fhir, timeout=60,
                                     headers={"Content-Type": "application/fhir+json"}) as c:
            async def one() -> tuple[int, str]:
                r = await c.post("/Patient", content=orjson.dumps(_patient(ident)),
                                 headers={"If-None-Exist": f"identifier=urn:race|{ident}"})
                return r.status_code, r.json().get("id", r.text)

            res = await asyncio.gather(*(one() for _ in range(RACERS)))
            found = (await c.get("/Patient", params={"identifier": f"urn:race|{ident}"})).json()
            return res, found["total"]

    res, total = asyncio.run(run())
    assert Counter(code for code, _ in res) == {201: 1, 200: RACERS - 1}, res
    assert len({rid for _, rid in res}) == 1
    assert total == 1


def test_concurrent_conditional_entries_in_transactions_create_once(server: Any) -> None:
    """Transaction Bundles racing on one identifier, half by ifNoneExist and half by conditional update
    (``PUT Patient?identifier=…``): one creates, every other matches it; none fails with 412 for finding
    duplicates."""
    ident = uuid.uuid4().hex

    async def run() -> tuple[list[tuple[int, str]], int]:
        async with httpx.AsyncClient(base_url=server.fhir, timeout=60,
                                     headers={"Content-Type": "application/fhir+json"}) as c:
            async def one(i: int) -> tuple[int, str]:
                req = ({"method": "POST", "url": "Patient", "ifNoneExist": f"identifier=urn:race|{ident}"}
                       if i % 2 == 0 else {"method": "PUT", "url": f"Patient?identifier=urn:race|{ident}"})
                bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": _patient(ident), "request": req}]}
                r = await c.post("", content=orjson.dumps(bundle))
                if r.status_code != 200:
                    return r.status_code, r.text
                return 200, r.json()["entry"][0]["response"]["status"]

            res = await asyncio.gather(*(one(i) for i in range(RACERS)))
            found = (await c.get("/Patient", params={"identifier": f"urn:race|{ident}"})).json()
            return res, found["total"]

    res, total = asyncio.run(run())
    assert all(code == 200 for code, _ in res), res
    assert Counter(status for _, status in res)["201 Created"] == 1, res
    assert total == 1


def test_concurrent_conditional_updates_over_http_create_once(server: Any) -> None:
    """``PUT Patient?identifier=…`` racing where nothing matches yet: one creates, the others update it (the
    match used to run outside the write's transaction: 30 of 32 created on PostgreSQL, 1–4 on SQLite)."""
    ident = uuid.uuid4().hex

    async def run() -> tuple[list[int], dict[str, Any], int]:
        async with httpx.AsyncClient(base_url=server.fhir, timeout=60,
                                     headers={"Content-Type": "application/fhir+json"}) as c:
            async def one(i: int) -> int:
                body = {**_patient(ident), "name": [{"family": f"racer{i}"}]}
                r = await c.put("/Patient", params={"identifier": f"urn:race|{ident}"}, content=orjson.dumps(body))
                return r.status_code

            codes = await asyncio.gather(*(one(i) for i in range(RACERS)))
            found = (await c.get("/Patient", params={"identifier": f"urn:race|{ident}"})).json()
            hist = (await c.get(f"/Patient/{found['entry'][0]['resource']['id']}/_history")).json()
            return list(codes), found, hist["total"]

    codes, found, versions = asyncio.run(run())
    assert Counter(codes) == {201: 1, 200: RACERS - 1}, codes
    assert found["total"] == 1
    assert versions == RACERS  # every racer's write is one version of the one resource


def test_transactions_with_conditions_in_opposite_orders_do_not_deadlock(server: Any, pg: Any) -> None:
    """Two transactions whose conditional creates name the same two conditions in opposite orders: each
    takes its conditions' locks in one order, so neither waits for the other while holding what it needs
    (they used to: PostgreSQL broke the deadlock after a second by failing one, which was retried)."""
    log = pg.dir / "log"
    before = log.read_text(errors="replace").count("deadlock detected")

    def bundle(idents: list[str]) -> bytes:
        return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": _patient(i),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier=urn:race|{i}"}}
            for i in idents]})

    async def run() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=server.fhir, timeout=60,
                                     headers={"Content-Type": "application/fhir+json"}) as c:
            pairs = [(uuid.uuid4().hex, uuid.uuid4().hex) for _ in range(8)]
            posts = [c.post("", content=bundle([x, y] if k == 0 else [y, x]))
                     for x, y in pairs for k in (0, 1)]
            codes = [r.status_code for r in await asyncio.gather(*posts)]
            totals = []
            for x, y in pairs:
                q = {"identifier": f"urn:race|{x},urn:race|{y}", "_total": "accurate"}
                totals.append((await c.get("/Patient", params=q)).json()["total"])
            return codes, totals

    codes, totals = asyncio.run(run())
    assert codes == [200] * 16
    assert totals == [2] * 8  # each pair's two patients, created once
    if server.server.store.is_sqlite:
        return  # one writer at a time: nothing to order
    assert log.read_text(errors="replace").count("deadlock detected") == before
