"""``$reindex``: rebuild search index rows (after a SearchParameter was added or changed).

- ``POST [base]/$reindex`` every resource type, ``POST [base]/[type]/$reindex`` one type,
  ``POST [base]/[type]/[id]/$reindex`` one resource.
- ``code`` (repeatable): only these parameters' rows; ``type`` (repeatable, system level): only these types.
- ``background=true``: answer 202 at once and run as a job; ``GET [base]/$reindex?mode=status`` shows the
  progress of recent jobs (also those started automatically when a SearchParameter is created).
"""

from __future__ import annotations

import asyncio
from typing import Any

from dhp import fhirjson
from dhp.errors import FHIRError
from dhp.interactions.operations import OperationCall, OperationResult, operation

_background: set[asyncio.Task[Any]] = set()


def _engine(call: OperationCall) -> Any:
    eng = call.server.search
    if eng is None:
        raise FHIRError(501, "Search is not available on this server", "not-supported",
                        message_id="search-unavailable")
    if eng.store is None:
        eng.store = call.server.store
    return eng


# Not declared state-changing: the dispatcher would then refuse the documented ``GET $reindex?mode=status``.
# Every other use changes state, so the handler itself only lets GET through for mode=status.
@operation("reindex", system=True, type_level=True, instance=True, affects_state=False)
async def reindex(call: OperationCall) -> dict[str, Any] | OperationResult:
    principal = call.ctx.principal
    if principal is not None and not principal.is_admin:
        # Rewriting every index row is an operator's job: any token with some scope could otherwise start it.
        raise FHIRError(403, "$reindex needs the dhp/admin scope", "forbidden", message_id="insufficient-scope")
    params = call.params
    status_only = params.str("mode") == "status"
    if call.method not in ("POST",) and not status_only:
        raise FHIRError(405, "$reindex changes the server: use POST (GET only with mode=status)", "not-supported",
                        message_id="method-not-allowed", headers={"Allow": "POST"})
    eng = _engine(call)
    codes = [str(c) for c in params.values("code") if c] or None
    if status_only:
        return {"resourceType": "Parameters",
                "parameter": [{"name": "job", "part": j.to_parameters()["parameter"]} for j in eng.jobs]}
    if codes:
        for c in codes:
            types = [call.resource_type] if call.resource_type else None
            if not any(eng.params.get(t, c) for t in (types or sorted(eng.params.resource_types))):
                raise FHIRError(400, f"Unknown search parameter '{c}'", "invalid", expression=["code"],
                                message_id="search-param-unknown")
    if call.id is not None:
        assert call.resource_type is not None
        async with call.server.store.begin() as tx:
            # Read (and on PostgreSQL lock) the current version in the transaction that writes its rows: an
            # update landing in between would otherwise get rows of the version before it.
            rec = await tx.current(call.resource_type, call.id)
            if rec is None or rec.deleted:
                raise FHIRError(404, f"{call.resource_type}/{call.id} is not known", "not-found",
                                message_id="not-found")
            await eng.reindex_one(tx, call.resource_type, call.id, fhirjson.loads(rec.content))
        return {"resourceType": "Parameters", "parameter": [
            {"name": "status", "valueCode": "completed"}, {"name": "processed", "valueInteger": 1}]}
    if call.resource_type:
        types: list[str] | None = [call.resource_type]
    else:
        types = [str(t) for t in params.values("type") if t] or None
        for t in types or []:
            if t not in eng.params.resource_types:
                raise FHIRError(400, f"Unknown resource type '{t}'", "invalid", expression=["type"],
                                message_id="unknown-resource-type")
    if params.bool("background"):
        from dhp.search.engine import ReindexJob

        job = ReindexJob(len(eng.jobs) + 1, list(types or []), codes)
        eng.jobs.append(job)
        task = asyncio.get_running_loop().create_task(eng.reindex(call.server.store, types, codes, job))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return OperationResult(job.to_parameters(), status=202)
    job = await eng.reindex(call.server.store, types, codes)
    if job.error:
        raise FHIRError(500, f"Reindexing failed: {job.error}", "exception", message_id="reindex-failed")
    return job.to_parameters()
