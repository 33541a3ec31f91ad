"""A DHP server process with search indexing detached — for benchmarks only.

``search_bench.py`` times creates over HTTP against this app and against the normal one, alternately, to
measure what indexing costs a create. Searches do not work here (no search engine), so it is never a
configuration to run a platform with, and it is not a setting of DHP itself.

    uvicorn --factory noindex_app:create_app   (with benchmarks/ on PYTHONPATH)
"""

from __future__ import annotations

from typing import Any

from dhp.api.app import create_process_app


def create_app() -> Any:
    inner = create_process_app()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # The server object exists once the lifespan has started; detach its engine before any write.
        server = inner.fhir.server
        if server is not None and server.search is not None:
            server.search = None
        await inner(scope, receive, send)

    return app
