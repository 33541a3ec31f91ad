"""Clinical documents (Form 096 birth, Form 003 inpatient stay): submit, keep, index, split, sign, show.

``DocumentService`` is wired at start-up as ``server.documents``; ``routes`` adds the human-facing pages
``/documents/{id}`` (HTML, uz/ru/en) and ``/documents/{id}/original`` (the exact submitted bytes).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dhp import fhirjson
from dhp.documents.service import DocumentService
from dhp.errors import FHIRError
from dhp.interactions.context import RequestContext

__all__ = ["DocumentService", "routes"]

#: The rendered page carries no scripts; the policy keeps it that way even if a narrative slipped through.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data: https:; base-uri 'none'; form-action 'none'"


def routes(server: Any) -> list[Route]:
    """Routes mounted at the application root; ``server`` is resolved lazily (only touched per request)."""

    async def context(request: Request) -> RequestContext:
        principal = None
        if server.settings.auth == "on":
            from dhp import auth

            principal = await auth.authenticate(server, request.headers)
        base = server.settings.base_url.rstrip("/") if server.settings.base_url else \
            str(request.base_url).rstrip("/") + "/fhir"
        lang = request.query_params.get("_language") or request.query_params.get("lang") \
            or request.headers.get("accept-language")
        return RequestContext(base_url=base, principal=principal, headers=request.headers, accept_language=lang)

    def problem(e: FHIRError) -> Response:
        headers = dict(e.headers)
        return Response(fhirjson.dumps(e.outcome()), e.status, headers,
                        media_type="application/fhir+json; charset=utf-8")

    async def page(request: Request) -> Response:
        from dhp.interactions import crud

        try:
            ctx = await context(request)
            rec = await crud.read(server, ctx, "Bundle", request.path_params["id"])
            html = await server.documents.render_html(ctx, rec)
        except FHIRError as e:
            return problem(e)
        return Response(html, 200, {"Content-Security-Policy": CSP, "ETag": crud.etag(rec.version),
                                    "Content-Language": _lang_of(html)},
                        media_type="text/html; charset=utf-8")

    async def original(request: Request) -> Response:
        from dhp.interactions import crud
        from dhp.store import documents as docstore

        try:
            ctx = await context(request)
            rec = await crud.read(server, ctx, "Bundle", request.path_params["id"])
            data = await docstore.read_source(server.store, rec.id)
            if data is None:
                raise FHIRError(404, f"Bundle/{rec.id} is not a stored clinical document", "not-found",
                                message_id="not-a-document")
        except FHIRError as e:
            return problem(e)
        from dhp.documents.sign import sha256_hex

        return Response(data, 200, {"ETag": f'"{sha256_hex(data)}"', "X-Content-SHA256": sha256_hex(data)},
                        media_type="application/fhir+json")

    return [Route("/documents/{id}", page, methods=["GET"]),
            Route("/documents/{id}/original", original, methods=["GET"])]


def _lang_of(html: bytes) -> str:
    head = html[:200].decode("utf-8", "replace")
    i = head.find('lang="')
    return head[i + 6:i + 8] if i >= 0 else "uz"
