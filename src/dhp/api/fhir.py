"""The FHIR REST endpoint under ``/fhir``: one ASGI app that parses the path and calls ``interactions``."""

from __future__ import annotations

import datetime
import logging
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dhp import fhirjson
from dhp.api import http
from dhp.errors import FHIRError, bad_request, outcome
from dhp.interactions import bundle, crud, shape
from dhp.interactions.capabilities import capability_statement
from dhp.interactions.context import RequestContext, Server
from dhp.interactions.operations import OperationCall, OperationResult, Params, find, load_all
from dhp.store import unavailable, unstorable_value

log = logging.getLogger("dhp.api")

_COMMON = ("_format", "_pretty", "_summary", "_elements")
_PATCH_TYPES = ("application/json-patch+json", *http.JSON_TYPES)
_FORM = "application/x-www-form-urlencoded"


_NO_QUERY = QueryParams("")


class _Headers(Headers):
    """Starlette's headers answer ``get`` through ``Mapping.get`` and a scan of the raw list that lower-cases
    and encodes the name each time; a create asks nine times. One dict, built on the first lookup, answers the
    same (the first value of each name)."""

    _first: dict[str, str]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            first = self._first
        except AttributeError:
            first = self._first = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(self._list)}
        return first.get(key.lower(), default)


class _Request(Request):
    """Most FHIR requests (read, create, update by id) carry no query string; Starlette parses even an empty
    one into a new QueryParams (~8 µs, 5 % of an empty request here), which every handler then asks for."""

    @property
    def query_params(self) -> QueryParams:
        if not self.scope.get("query_string"):
            return _NO_QUERY
        return super().query_params

    @property
    def headers(self) -> Headers:
        if not hasattr(self, "_headers"):
            self._headers = _Headers(scope=self.scope)
        return self._headers


def _public(path: str) -> bool:
    """Paths any client may read without a token: the CapabilityStatement and SMART discovery."""
    return path.rstrip("/").endswith(("/fhir/metadata", "/.well-known/smart-configuration"))


def _allow(*methods: str) -> FHIRError:
    return FHIRError(405, "Method not allowed here", "not-supported", message_id="method-not-allowed",
                     headers={"Allow": ", ".join(methods)})


class FHIRApp:
    """ASGI app for the FHIR API. ``server`` is set by the application's lifespan."""

    def __init__(self) -> None:
        self.server: Server | None = None
        #: Set when auth is on: async (request) -> principal, raising FHIRError(401) for a bad token.
        self.authenticate: Any = None
        self._bases: dict[tuple[str, str, str], str] = {}
        load_all()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = _Request(scope, receive)
        pretty = request.query_params.get("_pretty") == "true"
        try:
            if self.authenticate is not None and not _public(scope.get("path", "")):
                scope["dhp.principal"] = await self.authenticate(request)
            response = await self.handle(request, pretty)
        except FHIRError as e:
            response = http.error_response(e, pretty)
        except ClientDisconnect:
            return  # the client went away before its body arrived: nobody to answer, nothing was written
        except Exception as e:
            if unavailable(e):  # an outage, not a bug: tell the client to come back
                log.warning("database unavailable: %s", e)
                response = http.error_response(FHIRError(
                    503, "The database is unavailable; the request was not completed. Try again shortly.",
                    "transient", message_id="database-unavailable", headers={"Retry-After": "5"}), pretty)
            elif unstorable_value(e):
                response = http.error_response(FHIRError(
                    400, "The request contains a value the server cannot store or compare (a NUL character, "
                    "U+0000, or text longer than the field allows); nothing was changed", "invalid",
                    message_id="invalid-value"), pretty)
            else:  # anything else is a bug: log it, answer 500 with an OperationOutcome
                response = http.internal_error(e)
        await response(scope, receive, send)

    def context(self, request: Request) -> RequestContext:
        server = self.server
        assert server is not None
        base = server.settings.base_url.rstrip("/") if server.settings.base_url else self._base_for(request)
        return RequestContext(
            base_url=base,
            principal=request.scope.get("dhp.principal"),
            prefer=http.parse_prefer(request),
            headers=request.headers,
            accept_language=request.query_params.get("_language") or request.headers.get("accept-language"),
        )

    def _base_for(self, request: Request) -> str:
        """The FHIR base as the client addressed it (scheme + Host), cached per host: it is on every request."""
        scope = request.scope
        key = (scope.get("scheme", "http"), request.headers.get("host", ""), scope.get("app_root_path", ""))
        base = self._bases.get(key)
        if base is None:
            base = str(request.base_url).rstrip("/")
            if not base.endswith("/fhir"):
                base += "/fhir"
            if len(self._bases) < 1000:  # bounded: Host is client-controlled
                self._bases[key] = base
        return base

    async def handle(self, request: Request, pretty: bool) -> Response:
        server = self.server
        if server is None:
            raise FHIRError(503, "The server is starting", "transient")
        path = request.scope.get("path", "")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        parts = [p for p in path.split("/") if p]
        method = request.method
        if method == "HEAD":
            method = "GET"
        if parts and parts[0].startswith("$"):
            return await self.operation(request, pretty, parts[0][1:], None, None)
        if not parts:
            if method == "POST":
                return await self.post_bundle(request, pretty)
            if method == "GET":
                return await self.search(request, pretty, None, None)
            raise _allow("GET", "POST")
        if parts[0] == "metadata" and len(parts) == 1:
            if method != "GET":
                raise _allow("GET")
            ctx = self.context(request)
            http.negotiate(request)
            mode = request.query_params.get("mode", "full")
            if mode not in ("full", "normative", "terminology"):
                raise bad_request(f"mode must be full, normative or terminology, not {mode!r}", "mode")
            if mode == "terminology" and server.terminology is not None:
                from dhp import __version__

                return http.fhir_response(server.terminology.capabilities(ctx.base_url, __version__),
                                          pretty=pretty)
            return http.fhir_response(capability_statement(server, ctx.base_url), pretty=pretty)
        if parts[0] == "_history" and len(parts) == 1:
            if method != "GET":
                raise _allow("GET")
            ctx = self.context(request)
            return http.fhir_response(await crud.history(server, ctx, None, None, self.query(request)),
                                      pretty=pretty)
        if parts[0] == "_search" and len(parts) == 1:  # POST [base]/_search: a system search
            if method != "POST":
                raise _allow("POST")
            return await self.search(request, pretty, None, None, post=True)
        rtype = parts[0]
        crud.check_type(server, rtype)
        if len(parts) == 1:
            if method == "POST":
                return await self.create(request, pretty, rtype)
            if method == "GET":
                return await self.search(request, pretty, rtype, None)
            if method in ("PUT", "DELETE", "PATCH") and request.url.query:
                return await self.conditional(request, pretty, rtype, method)
            raise _allow("GET", "POST")
        second = parts[1]
        if len(parts) == 2:
            if second == "_search":
                if method != "POST":
                    raise _allow("POST")
                return await self.search(request, pretty, rtype, None, post=True)
            if second == "_history":
                if method != "GET":
                    raise _allow("GET")
                ctx = self.context(request)
                return http.fhir_response(await crud.history(server, ctx, rtype, None, self.query(request)),
                                          pretty=pretty)
            if second.startswith("$"):
                return await self.operation(request, pretty, second[1:], rtype, None)
            rid = second
            if method == "GET":
                return await self.read(request, pretty, rtype, rid)
            if method == "PUT":
                return await self.update(request, pretty, rtype, rid)
            if method == "PATCH":
                return await self.patch(request, pretty, rtype, rid)
            if method == "DELETE":
                return await self.delete(request, rtype, rid)
            raise _allow("GET", "PUT", "PATCH", "DELETE")
        rid, third = parts[1], parts[2]
        if third.startswith("$") and len(parts) == 3:
            return await self.operation(request, pretty, third[1:], rtype, rid)
        if third == "_history":
            if method != "GET":
                raise _allow("GET")
            if len(parts) == 3:
                ctx = self.context(request)
                return http.fhir_response(await crud.history(server, ctx, rtype, rid, self.query(request)),
                                          pretty=pretty)
            if len(parts) == 4:
                return await self.vread(request, pretty, rtype, rid, parts[3])
        if len(parts) == 3 and method == "GET":
            return await self.search(request, pretty, third, None, compartment=(rtype, rid))
        if len(parts) == 4 and parts[3] == "_search":  # POST [base]/Patient/x/Observation/_search
            if method != "POST":
                raise _allow("POST")
            return await self.search(request, pretty, third, None, post=True, compartment=(rtype, rid))
        raise FHIRError(404, f"No such endpoint: {path}", "not-found", message_id="unknown-endpoint")

    @staticmethod
    def query(request: Request) -> list[tuple[str, str]]:
        try:
            # errors="strict": a %-escape that is not UTF-8 would otherwise become U+FFFD and be searched for.
            return parse_qsl(request.url.query, keep_blank_values=True, strict_parsing=False, errors="strict")
        except ValueError as e:  # UnicodeDecodeError included
            raise bad_request(f"Malformed query string: {e}") from None

    async def body(self, request: Request) -> bytes:
        assert self.server is not None
        return await http.read_body(request, self.server.settings.max_body_bytes)

    def _shaped(self, request: Request, resource_bytes: bytes) -> bytes | dict[str, Any]:
        summary = request.query_params.get("_summary")
        elements = request.query_params.get("_elements")
        if summary is None and elements is None:
            return resource_bytes
        assert self.server is not None
        return shape.shape_resource(self.server, fhirjson.loads(resource_bytes), summary,
                                    [e for e in elements.split(",") if e] if elements else None)

    # ------------------------------------------------------------ interactions

    async def read(self, request: Request, pretty: bool, rtype: str, rid: str) -> Response:
        assert self.server is not None
        documents = self.server.documents
        media = http.negotiate(request, html_ok=documents is not None and rtype == "Bundle")
        ctx = self.context(request)
        rec = await crud.read(self.server, ctx, rtype, rid)
        if media == "text/html":
            # A document Bundle shown to a person (documents renders it in the requested language).
            html = await documents.render_html(ctx, rec)
            return Response(html, 200, {"ETag": crud.etag(rec.version)}, media_type="text/html; charset=utf-8")
        tag = crud.etag(rec.version)
        headers = {"ETag": tag, "Last-Modified": crud.http_date(rec.last_updated)}
        inm = request.headers.get("if-none-match")
        if inm is not None and _none_match(inm, rec.version):
            return Response(status_code=304, headers=headers)
        ims = request.headers.get("if-modified-since")
        if ims is not None and inm is None:
            since = _http_date(ims)
            if since is not None and rec.last_updated // 1_000_000 <= since:
                return Response(status_code=304, headers=headers)
        return http.fhir_response(self._shaped(request, rec.content), 200, headers, pretty=pretty)

    async def vread(self, request: Request, pretty: bool, rtype: str, rid: str, vid: str) -> Response:
        http.negotiate(request)
        assert self.server is not None
        rec = await crud.vread(self.server, self.context(request), rtype, rid, vid)
        headers = {"ETag": crud.etag(rec.version), "Last-Modified": crud.http_date(rec.last_updated)}
        return http.fhir_response(self._shaped(request, rec.content), 200, headers, pretty=pretty)

    def _write_response(self, ctx: RequestContext, res: crud.WriteResult, pretty: bool) -> Response:
        rec = res.rec
        headers: dict[str, str] = {}
        if rec is not None:
            headers["ETag"] = crud.etag(rec.version)
            headers["Last-Modified"] = crud.http_date(rec.last_updated)
            if res.status in (200, 201):
                headers["Location"] = f"{ctx.base_url}/{rec.type}/{rec.id}/_history/{rec.version}"
        ret = ctx.prefer.get("return", "representation")
        if ret == "minimal":
            return Response(status_code=res.status, headers=headers)
        if ret == "OperationOutcome":
            return http.fhir_response(outcome(res.issues), res.status, headers, pretty=pretty)
        body: Any = rec.content if rec is not None and res.resource is not None else res.resource
        return http.fhir_response(body, res.status, headers, pretty=pretty)

    async def create(self, request: Request, pretty: bool, rtype: str) -> Response:
        http.negotiate(request)
        http.content_kind(request)
        assert self.server is not None
        ctx = self.context(request)
        await self.server.maybe_sync_conformance()
        source = await self.body(request)
        resource = crud.parse_resource(source)
        res = await crud.create(self.server, ctx, rtype, resource, source,
                                if_none_exist=request.headers.get("if-none-exist"))
        return self._write_response(ctx, res, pretty)

    async def update(self, request: Request, pretty: bool, rtype: str, rid: str) -> Response:
        http.negotiate(request)
        http.content_kind(request)
        assert self.server is not None
        ctx = self.context(request)
        await self.server.maybe_sync_conformance()
        source = await self.body(request)
        resource = crud.parse_resource(source)
        res = await crud.update(self.server, ctx, rtype, rid, resource, source,
                                if_match=request.headers.get("if-match"))
        return self._write_response(ctx, res, pretty)

    async def patch(self, request: Request, pretty: bool, rtype: str, rid: str) -> Response:
        http.negotiate(request)
        kind = http.content_kind(request, _PATCH_TYPES)
        assert self.server is not None
        ctx = self.context(request)
        source = await self.body(request)
        try:
            body = fhirjson.loads(source)
        except fhirjson.JSONError as e:
            raise FHIRError(400, f"Malformed JSON: {e}", "structure", message_id="malformed-json") from None
        res = await crud.patch(self.server, ctx, rtype, rid, body,
                               "json-patch" if kind == "application/json-patch+json" else "fhirpath",
                               if_match=request.headers.get("if-match"))
        return self._write_response(ctx, res, pretty)

    async def delete(self, request: Request, rtype: str, rid: str) -> Response:
        assert self.server is not None
        ctx = self.context(request)
        res = await crud.delete(self.server, ctx, rtype, rid, if_match=request.headers.get("if-match"))
        headers = {"ETag": crud.etag(res.rec.version)} if res.rec is not None else {}
        if ctx.prefer.get("return") == "OperationOutcome":
            from dhp.errors import Issue

            return http.fhir_response(outcome(Issue("information", "informational",
                                                    f"{rtype}/{rid} deleted", message_id="deleted")),
                                      200, headers)
        return Response(status_code=204, headers=headers)

    async def conditional(self, request: Request, pretty: bool, rtype: str, method: str) -> Response:
        assert self.server is not None
        ctx = self.context(request)
        query = [(k, v) for k, v in self.query(request) if k not in _COMMON]
        if not query:
            raise bad_request("A conditional operation needs search parameters", message_id="bad-conditional")
        from urllib.parse import urlencode

        if method in ("DELETE", "PATCH"):
            ids = await crud.conditional_match(self.server, rtype, urlencode(query))
            if method == "DELETE":
                if len(ids) > 1:
                    raise FHIRError(412, f"Conditional delete matched {len(ids)} resources", "duplicate",
                                    message_id="conditional-multiple")
                if not ids:
                    return Response(status_code=204)
                return await self.delete(request, rtype, ids[0])
            if len(ids) > 1:
                raise FHIRError(412, f"Conditional patch matched {len(ids)} resources", "duplicate",
                                message_id="conditional-multiple")
            if not ids:
                raise FHIRError(404, "Conditional patch matched no resource", "not-found")
            return await self.patch(request, pretty, rtype, ids[0])
        http.negotiate(request)
        http.content_kind(request)
        source = await self.body(request)
        resource = crud.parse_resource(source)
        # The match and the write in one transaction: racing conditional updates create one resource at most.
        res = await crud.conditional_update(self.server, ctx, rtype, urlencode(query), resource, source,
                                            if_match=request.headers.get("if-match"))
        return self._write_response(ctx, res, pretty)

    async def post_bundle(self, request: Request, pretty: bool) -> Response:
        http.negotiate(request)
        http.content_kind(request)
        assert self.server is not None
        ctx = self.context(request)
        await self.server.maybe_sync_conformance()
        source = await self.body(request)
        resource = crud.parse_resource(source)
        if resource.get("resourceType") != "Bundle":
            raise bad_request("POST to the base takes a batch or transaction Bundle", "resourceType")
        if self.server.validator is not None and self.server.settings.validation != "off":
            # The Bundle's own shape (bdl-* rules); entries are validated as they are written.
            shell = {k: v for k, v in resource.items() if k != "entry"}
            issues = [i for i in self.server.validator.validate(shell, source=None)
                      if i.severity in ("error", "fatal")]
            if issues and self.server.settings.validation == "strict":
                raise FHIRError(422, issues[0].diagnostics, issues=issues)
        result = await bundle.process(self.server, ctx, resource)
        return http.fhir_response(result, 200, pretty=pretty)

    async def search(self, request: Request, pretty: bool, rtype: str | None, _id: str | None, *,
                     post: bool = False, compartment: tuple[str, str] | None = None) -> Response:
        http.negotiate(request)
        assert self.server is not None
        server = self.server
        ctx = self.context(request)
        if server.search is None:
            raise FHIRError(400, "Search is not available on this server", "not-supported",
                            message_id="search-unavailable")
        await server.maybe_sync_conformance()
        params = self.query(request)
        if post:
            kind = http.content_kind(request, (_FORM,)) if request.headers.get("content-type") else _FORM
            if kind == _FORM:
                try:
                    body = (await self.body(request)).decode("utf-8")
                    params += parse_qsl(body, keep_blank_values=True, errors="strict")
                except ValueError as e:  # not UTF-8, raw or %-escaped: searching for U+FFFD would be wrong
                    raise bad_request(f"The form-encoded search body is not UTF-8: {e}") from None
        from dhp.interactions import search as search_mod

        # SMART 's' permission: on the searched type, or on every type for a system search.
        if ctx.principal is not None:
            target = rtype if rtype not in (None, "*") else "*"
            if not ctx.principal.can("s", target):
                raise FHIRError(403, f"The access token's scopes do not allow searching {target}", "forbidden",
                                message_id="insufficient-scope")
        if compartment is not None:
            comp_type, comp_id = compartment
            if rtype != "*":
                crud.check_type(server, rtype or "")
            result = await search_mod.search_compartment(server, ctx, comp_type, comp_id, rtype or "*", params)
        elif rtype is None:
            result = await search_mod.search_system(server, ctx, params)
        else:
            result = await search_mod.search_type(server, ctx, rtype, params)
        return http.fhir_response(result, 200, pretty=pretty)

    async def operation(self, request: Request, pretty: bool, name: str, rtype: str | None,
                        rid: str | None) -> Response:
        assert self.server is not None
        server = self.server
        level = "instance" if rid else ("type" if rtype else "system")
        op = find(name, level, rtype)
        if op is None:
            raise FHIRError(404, f"Operation ${name} is not supported at the {level} level"
                            + (f" of {rtype}" if rtype else ""), "not-supported", message_id="unknown-operation")
        media = http.negotiate(request, html_ok=True)
        ctx = self.context(request)
        await server.maybe_sync_conformance()
        body_resource: dict[str, Any] | None = None
        source: bytes | None = None
        if request.method == "POST":
            http.content_kind(request)
            source = await self.body(request)
            if source.strip():
                body_resource = crud.parse_resource(source)
            params = Params.from_resource(body_resource) if body_resource and \
                body_resource.get("resourceType") == "Parameters" else Params([])
            if body_resource is not None and body_resource.get("resourceType") == "Parameters":
                body_resource = None
            params.items += Params.from_query(self.query(request)).items
        elif request.method in ("GET", "HEAD"):
            if op.affects_state:
                raise _allow("POST")
            params = Params.from_query(self.query(request))
        else:
            raise _allow("GET", "POST")
        call = OperationCall(server, ctx, name, rtype, rid, params, request.method, body_resource,
                             source if body_resource is not None else None)
        call.ctx.headers = request.headers
        result = await op.handler(call)
        if isinstance(result, OperationResult):
            if result.raw is not None:
                return Response(result.raw, result.status, result.headers,
                                media_type=result.media_type or f"{http.FHIR_JSON}; charset=utf-8")
            return http.fhir_response(result.resource, result.status, result.headers, pretty=pretty)
        _ = media
        return http.fhir_response(result, 200, pretty=pretty)


def _none_match(value: str, version: int) -> bool:
    """Whether an If-None-Match list names the current version (RFC 9110 13.1.2, weak comparison): ``*`` names
    any current representation. Entity tags that are not ours (``"abc"``) simply do not match."""
    for tag in value.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        m = crud.ETAG_RE.match(tag)
        if m is not None and int(m.group(1)) == version:
            return True
    return False


def _http_date(value: str) -> int | None:
    """An HTTP-date as Unix seconds, or None when it is not one (RFC 9110 13.1.3: the header is then ignored).
    HTTP dates are GMT; asctime's form carries no zone and a ``-0000`` zone parses as naive: both are UTC."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    try:
        return int(when.timestamp())
    except (OverflowError, ValueError, OSError):
        return None
