"""UZ Core AuditEvents for sign-ins, token issue and their failures.

Events are ordinary FHIR resources written through the store (version 1, history row). Writes are grouped:
concurrent requests hand their events to one writer that commits them in a single transaction and then
releases every waiting request, so auditing costs one commit per burst instead of one per token while each
response still leaves only after its event is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from dhp import fhirjson
from dhp.store import Store, StoredResource, new_id, now_us
from dhp.store.auth import put_new_resources

log = logging.getLogger("dhp.auth")

PROFILE = "https://dhp.uz/fhir/core/StructureDefinition/uz-core-auditevent"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CLIENT_ID_SYSTEM = "https://dhp.uz/fhir/sid/oauth-client"
USERNAME_SYSTEM = "https://dhp.uz/fhir/sid/username"

_CATEGORY = {"coding": [{"system": DCM, "code": "110114", "display": "User Authentication"}]}
_LOGIN = {"coding": [{"system": DCM, "code": "110122", "display": "Login"}]}
_LOGOUT = {"coding": [{"system": DCM, "code": "110123", "display": "Logout"}]}
_SOURCE = {
    "observer": {"display": "Uzbekistan Digital Health Platform"},
    "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                          "display": "Application Server"}]}],
}


def _instant(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_event(*, kind: str, success: bool, description: str, client_id: str | None = None,
                client_name: str | None = None, username: str | None = None, fhir_user: str | None = None,
                patient: str | None = None, address: str | None = None, ts: int | None = None) -> dict[str, Any]:
    """An AuditEvent (uz-core-auditevent). ``kind``: login | token | revoke."""
    ts = ts or now_us()
    agents: list[dict[str, Any]] = []
    if username or fhir_user:
        who: dict[str, Any] = {}
        if fhir_user:
            who["reference"] = fhir_user
        if username:
            who["identifier"] = {"system": USERNAME_SYSTEM, "value": username}
            who["display"] = username
        agent: dict[str, Any] = {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                                 "code": "humanuser", "display": "human user"}]},
            "who": who, "requestor": True,
        }
        if address:
            agent["networkString"] = address
        agents.append(agent)
    if client_id:
        who = {"identifier": {"system": CLIENT_ID_SYSTEM, "value": client_id}}
        if client_name:
            who["display"] = client_name
        agent = {"type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
                 "who": who, "requestor": not agents}
        if address and not agents:
            agent["networkString"] = address
        agents.append(agent)
    if not agents:
        agents.append({"type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
                       "who": {"display": "unidentified client"}, "requestor": True,
                       **({"networkString": address} if address else {})})
    ev: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "meta": {"profile": [PROFILE]},
        "category": [_CATEGORY],
        "code": _LOGOUT if kind == "revoke" else _LOGIN,
        "action": "E",
        "occurredDateTime": _instant(ts),
        "recorded": _instant(ts),
        "outcome": {
            "code": {"system": "http://hl7.org/fhir/issue-severity", "code": "success" if success else "error"},
            "detail": [{"text": description}],
        },
        "agent": agents,
        "source": _SOURCE,
    }
    if patient:
        ev["patient"] = {"reference": f"Patient/{patient}"}
    return ev


#: Seconds a batch waits for more events when the previous one was committed less than BUSY_WITHIN ago.
BATCH_WINDOW = 0.002
BUSY_WITHIN = 0.02


class AuditWriter:
    """Group commit of AuditEvents: ``await write(event)`` returns once the event is committed."""

    def __init__(self, store: Store, server: Any = None) -> None:
        self.store = store
        self.server = server  # its search engine (if any) indexes the events so AuditEvent?… finds them
        self._pending: list[tuple[dict[str, Any], asyncio.Future[str]]] = []
        self._task: asyncio.Task[None] | None = None
        self._last_commit = -BUSY_WITHIN

    async def wait_indexed(self) -> None:
        """Events are indexed in the transaction that stores them: nothing is ever pending."""
        if self._task is not None and not self._task.done():
            await self._task

    async def write(self, event: dict[str, Any]) -> str:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((event, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._pending:
            if time.monotonic() - self._last_commit < BUSY_WITHIN:
                # Under load, let a few more events join: a commit costs about the same for one event as for
                # ten (their rows land on the same few pages), so bigger batches are most of the saving.
                await asyncio.sleep(BATCH_WINDOW)
            batch, self._pending = self._pending, []
            try:
                ids = await self._commit([e for e, _ in batch])
            except Exception as e:  # the callers decide what a failed audit means
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self._last_commit = time.monotonic()
            for (_, f), rid in zip(batch, ids, strict=True):
                if not f.done():
                    f.set_result(rid)

    async def _commit(self, events: list[dict[str, Any]]) -> list[str]:
        from dhp.store import retry_conflicts

        ts = now_us()
        prepared: list[tuple[str, bytes, str | None, dict[str, Any]]] = []
        for e in events:
            rid = new_id()
            body = {"resourceType": "AuditEvent", "id": rid,
                    "meta": {"versionId": "1", "lastUpdated": _instant(ts), **e.get("meta", {})}}
            body.update({k: v for k, v in e.items() if k not in ("resourceType", "meta")})
            patient = (e.get("patient") or {}).get("reference", "")
            prepared.append((rid, fhirjson.dumps(body), patient.split("/", 1)[1] if patient else None, body))

        search = getattr(self.server, "search", None)

        async def once() -> None:
            async with self.store.begin() as tx:
                await put_new_resources(tx, [(StoredResource("AuditEvent", rid, 1, ts, False, content), patient)
                                             for rid, content, patient, _b in prepared])
                # In the same transaction (one commit for the batch): events are searchable once stored.
                if search is not None and hasattr(search, "index_many"):
                    await search.index_many(tx, [("AuditEvent", rid, body) for rid, _c, _p, body in prepared])

        await retry_conflicts(once)
        return [p[0] for p in prepared]

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.wait_indexed()
