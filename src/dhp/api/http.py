"""HTTP details of the FHIR API: content negotiation, Prefer, body reading, responses, error mapping."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from dhp import fhirjson
from dhp.errors import FHIRError, Issue, outcome
from dhp.httputil import weighted_values

log = logging.getLogger("dhp.api")

FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json", "text/json")
_FORMAT_ALIASES = {"json": FHIR_JSON, "application/json": "application/json", "application/fhir+json": FHIR_JSON,
                   "text/json": "application/json"}
_XML = ("xml", "text/xml", "application/xml", "application/fhir+xml")


def negotiate(request: Request, html_ok: bool = False) -> str:
    """The media type to answer with, from ``_format`` or ``Accept``; 406 when none is acceptable."""
    fmt = request.query_params.get("_format")
    if fmt:
        f = fmt.split(";")[0].strip().lower()
        if f in _FORMAT_ALIASES:
            return _FORMAT_ALIASES[f]
        if html_ok and f in ("html", "text/html"):
            return "text/html"
        if f in _XML:
            raise FHIRError(406, "This server speaks JSON only; XML is not supported", "not-supported",
                            message_id="xml-not-supported")
        raise FHIRError(406, f"Unsupported _format '{fmt}'", "not-supported", message_id="not-acceptable")
    accept = request.headers.get("accept", "")
    if not accept:
        return FHIR_JSON
    best = _accepted.get((accept, html_ok))
    if best is None:
        best = _best_of(accept, html_ok)
        if len(_accepted) < 512:  # Accept is client-controlled: keep it bounded
            _accepted[(accept, html_ok)] = best
    return best


#: negotiate's answers by (Accept, html_ok): clients send the same few Accept values on every request.
_accepted: dict[tuple[str, bool], str] = {}


def _best_of(accept: str, html_ok: bool) -> str:
    best: str | None = None
    for mt in weighted_values(accept):
        if mt in (FHIR_JSON, "*/*", "application/*"):
            best = FHIR_JSON
        elif mt in ("application/json", "text/json"):
            best = "application/json"
        elif mt == "text/html" and html_ok:
            best = "text/html"
        if best:
            break
    if best is None:
        raise FHIRError(406, f"None of the accepted media types ({accept}) can be produced; "
                        "use application/fhir+json", "not-supported", message_id="not-acceptable")
    return best


def parse_prefer(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in request.headers.getlist("prefer"):
        for part in h.split(";"):
            for item in part.split(","):
                k, _, v = item.strip().partition("=")
                if k:
                    out[k.strip().lower()] = v.strip().strip('"')
    ret = out.get("return")
    if ret is not None and ret not in ("minimal", "representation", "OperationOutcome"):
        raise FHIRError(400, f"Prefer: return={ret} is not one of minimal, representation, OperationOutcome",
                        "invalid", message_id="bad-prefer")
    handling = out.get("handling")
    if handling is not None and handling not in ("strict", "lenient"):
        raise FHIRError(400, f"Prefer: handling={handling} is not strict or lenient", "invalid",
                        message_id="bad-prefer")
    return out


async def read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise FHIRError(413, f"Request body of {cl} bytes exceeds the limit of {limit} bytes",
                                "too-costly", message_id="body-too-large")
        except ValueError:
            raise FHIRError(400, "Invalid Content-Length", "invalid") from None
    # The ASGI messages themselves, not Request.stream(): an async generator per request cost more than the
    # rest of reading a body, which mostly comes in one message.
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise FHIRError(413, f"Request body exceeds the limit of {limit} bytes", "too-costly",
                            message_id="body-too-large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # what Request.body() and stream() answer from, should anything ask again
    return body


def content_kind(request: Request, allowed: tuple[str, ...] = JSON_TYPES) -> str:
    """The request body's media type (without parameters); 415 unless it is one of ``allowed``."""
    ct = request.headers.get("content-type", "")
    mt = ct.split(";")[0].strip().lower()
    if not mt:
        return FHIR_JSON  # tolerate clients that send JSON without saying so
    if mt not in allowed:
        raise FHIRError(415, f"Unsupported Content-Type '{ct}'; send {' or '.join(allowed)}", "not-supported",
                        message_id="unsupported-media-type")
    for p in ct.split(";")[1:]:
        k, _, v = p.strip().partition("=")
        if k.lower() == "charset" and v.strip('"').lower() not in ("utf-8", "utf8"):
            raise FHIRError(415, f"Only UTF-8 is accepted, not charset={v}", "not-supported",
                            message_id="unsupported-charset")
    return mt


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None,
                  media_type: str = FHIR_JSON, pretty: bool = False) -> Response:
    if isinstance(body, bytes):
        content = body
        if pretty:
            content = fhirjson.dumps(fhirjson.loads(body), pretty=True)
    elif body is None:
        content = b""
    else:
        try:
            content = fhirjson.dumps(body, pretty=pretty)
        except TypeError:
            # Only what a request put there can fail (a lone surrogate echoed in an error's diagnostics or a
            # batch entry's outcome): answer with it replaced by U+FFFD rather than a bare 500.
            content = fhirjson.dumps(_replace_surrogates(body), pretty=pretty)
    return FHIRResponse(content, status, headers, f"{media_type}; charset=utf-8" if content else None)


def _replace_surrogates(node: Any) -> Any:
    if isinstance(node, str):
        # Encoded with the surrogates kept, they are invalid UTF-8, which decoding turns into U+FFFD.
        return node if node.isascii() else node.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(node, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_surrogates(v) for v in node]
    return node


class FHIRResponse(Response):
    """A Response whose header list is built in one pass: Starlette's ``init_headers`` encodes the headers,
    then lists and searches their names for each header it may add, on every response."""

    def __init__(self, content: bytes, status_code: int = 200, headers: dict[str, str] | None = None,
                 media_type: str | None = None) -> None:
        self.status_code = status_code
        self.background = None
        self.body = content
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()] if headers else []
        given = {k for k, _v in raw}
        if status_code >= 200 and status_code not in (204, 304) and b"content-length" not in given:
            raw.append((b"content-length", str(len(content)).encode("latin-1")))
        if media_type is not None and b"content-type" not in given:
            raw.append((b"content-type", media_type.encode("latin-1")))
        self.raw_headers = raw


def error_response(err: FHIRError, pretty: bool = False) -> Response:
    headers = dict(err.headers)
    return fhir_response(err.outcome(), err.status, headers, pretty=pretty)


def internal_error(exc: BaseException) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return fhir_response(outcome(Issue("fatal", "exception", "Internal server error; the request was not applied",
                                       message_id="internal-error")), 500)
