"""The HTTP limits `cascade serve` holds before a client's bytes cost memory.

uvicorn's httptools protocol reads headers without a size, count or time limit, and Starlette's
``request.body()`` reads a body whole before anyone can check its size. Here:

- ``guarded_protocol(limits, refused)``: the httptools protocol with a header-size and a
  header-count limit (431) and a header timeout (408) that runs from the connection's start, or
  the end of its previous response, to the end of the headers: a client that trickles headers,
  or opens a connection and sends nothing, is closed. Idle keep-alive connections are closed by
  uvicorn's own ``timeout_keep_alive`` (``Limits.idle_timeout_s``).
- ``read_body``: the body as it streams in, refused (413) as soon as it passes
  ``Limits.max_body`` (a declared Content-Length is refused before a byte is read; chunked
  bodies are counted as they come), and within ``Limits.body_timeout_s`` (408).
- ``parse_json``: JSON nested at most ``Limits.max_depth`` levels (400), checked on the bytes
  before the parser recurses.

Every refusal closes the connection (``connection: close``), so the rest of an oversized body is
never read, and is reported to ``refused(route, status)`` so that it is counted.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

CONNECTION_ROUTE = "(connection)"  # the route label of a refusal made before a request had a path


@dataclass(frozen=True)
class Limits:
    """What one request may cost. ``max_batch``: requests in one ``{"requests": [...]}`` body;
    ``max_queue``: requests waiting for the batcher before new ones get 503."""

    max_body: int = 1 << 20
    max_batch: int = 256
    max_depth: int = 32
    max_header_bytes: int = 16 << 10
    max_headers: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_queue: int = 1024

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def limits_from(settings: dict[str, Any]) -> Limits:
    """The limits `cascade serve`'s options set (``max_batch``); the others are fixed."""
    return Limits(max_batch=settings.get("max_batch", Limits.max_batch))


class Refused(Exception):
    """A request refused before it reached the service: its status, message and field."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _response(status: int, reason: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    return head.encode("ascii") + payload


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``limits`` on headers; ``refused(route, status)`` is
    called for each connection it refuses. ``guarded_protocol`` binds both; a ``--workers``
    process sets them on this class itself (uvicorn imports it by name in each worker)."""

    limits: Limits = Limits()
    refused: Callable[[int, str], None] = staticmethod(lambda route, status: None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: tuple[int, str, str] | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    # the header phase: from the connection (or the last response) to the end of the headers
    def _arm(self) -> None:
        self._disarm()
        self._in_headers, self._header_bytes, self._raw_bytes, self._header_count = True, 0, 0, 0
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        if self.transport.is_closing():
            return
        self.refused(CONNECTION_ROUTE, status)
        self.transport.write(_response(status, reason, {"error": message, "field": None}))
        self.transport.close()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers:
            self._refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s")

    def _count(self, n: int, headers: int = 0) -> None:
        self._header_bytes += n
        self._header_count += headers
        if self._header_bytes > self.limits.max_header_bytes:
            self._refusal = (431, "Request Header Fields Too Large", f"the request line and headers pass {self.limits.max_header_bytes} bytes")
        elif self._header_count > self.limits.max_headers:
            self._refusal = (431, "Request Header Fields Too Large", f"more than {self.limits.max_headers} headers")
        if self._refusal is not None:
            raise ValueError(self._refusal[2])  # httptools stops parsing: send_400_response below

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # a header line still incomplete is buffered by the parser, unseen by the callbacks
        if self._in_headers and not self.transport.is_closing():
            self._raw_bytes += len(data)
            if self._raw_bytes > self.limits.max_header_bytes:
                self._refusal = (431, "Request Header Fields Too Large", f"the request line and headers pass {self.limits.max_header_bytes} bytes")
                self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes, self._header_count = True, 0, 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value), 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers, self._raw_bytes = False, 0
        self._disarm()
        super().on_headers_complete()
        if getattr(self, "_draining", False) and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed: the server is stopping

    def shutdown(self) -> None:
        """A graceful stop (a reload under --workers replaces each worker): uvicorn closes every
        connection with no request under way, and a client whose request was already on the wire
        to a connection just accepted saw its connection reset. Such a connection gets a second
        to send its request, which is answered and then closed."""
        if self.cycle is not None and not self.cycle.response_complete:
            return super().shutdown()
        self._draining = True
        self._disarm()
        self._header_timer = self.loop.call_later(min(1.0, self.limits.header_timeout_s), self._drained)

    def _drained(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request's headers are already in
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm()

    def send_400_response(self, msg: str) -> None:
        status, reason, message = self._refusal or (400, "Bad Request", f"not an HTTP/1.1 request: {msg}")
        self._refuse(status, reason, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(limits: Limits, refused: Callable[[int, str], None]) -> type[GuardedHttpTools]:
    """``GuardedHttpTools`` bound to ``limits`` and ``refused`` (one server among several in a
    process: each has its own)."""
    return type("GuardedHttpTools", (GuardedHttpTools,), {"limits": limits, "refused": staticmethod(refused)})


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, read as it streams in: ``Refused`` 413 once it passes ``limits.max_body``
    (before reading, for a declared Content-Length), 408 past ``limits.body_timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length is not a number: {declared[:40]!r}")
        if int(declared) > limits.max_body:
            raise Refused(413, f"body of {int(declared):,} bytes, at most {limits.max_body:,}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body:
                    raise Refused(413, f"body passes {limits.max_body:,} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(408, f"the body did not arrive within {limits.body_timeout_s:g} s") from None
    return b"".join(chunks)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(body: bytes) -> int:
    """How deeply ``body``'s arrays and objects nest (brackets inside strings not counted)."""
    code = np.frombuffer(_STRING.sub(b"", body), np.uint8)
    step = np.isin(code, (ord("["), ord("{"))).astype(np.int32) - np.isin(code, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def parse_json(body: bytes, limits: Limits) -> Any:
    """``body`` as JSON, ``Refused`` 400 when it is not JSON or nests past ``limits.max_depth``."""
    # nesting needs an opening bracket a level: a body with few of them needs no scan
    depth = json_depth(body) if body.count(b"[") + body.count(b"{") > limits.max_depth else 0
    if depth > limits.max_depth:
        raise Refused(400, f"JSON nested {depth} levels deep, at most {limits.max_depth}")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise Refused(400, f"body is not valid JSON: {e}") from None
