"""Slow and greedy clients, stopped where uvicorn reads the socket.

uvicorn times out only idle keep-alive connections: headers sent at a byte a second, or a body that stops half
way, hold a connection (and a task waiting on `receive()`) for ever, and every such connection is kept. This
protocol (uvicorn's httptools one, plus three checks) closes a connection whose headers are not complete within
`client_timeout`, or whose body makes no progress for that long; answers 431 to headers over `MAX_HEADER_BYTES`;
and refuses connections beyond `max_connections`. A closed connection is a disconnect to the app, so the proxy
cancels what it had started. The checks cost two timer calls per request (`bench/proxy_overhead.py` shows them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024  # request line and headers; uvicorn's h11 default is 16 KiB, llama-server's 8 KiB


class GuardedHttpProtocol(HttpToolsProtocol):
    client_timeout = 30.0
    max_connections = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._body_at = 0.0  # loop time of the last body bytes while a body is expected

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning('refusing a connection: %d open (max_connections)', len(self.connections) - 1)
            transport.abort()
            return
        self._arm(self._headers_late)  # the first request's headers are due too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---- headers -------------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._timer is None:
            self._arm(self._headers_late)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._disarm()
            self.transport.write(
                b'HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n'
            )
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope and not self.transport.is_closing():
            if _has_body(self.scope['headers']):
                self._body_at = self.loop.time()
                self._arm(self._body_late)

    # ---- body ----------------------------------------------------------------------------------------------
    def on_body(self, body: bytes) -> None:
        self._body_at = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # ---- timers --------------------------------------------------------------------------------------------
    def _arm(self, callback: Any, delay: float | None = None) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.client_timeout if delay is None else delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_late(self) -> None:
        self._timer = None
        idle = self.loop.time() - self._body_at
        if idle < self.client_timeout:
            self._arm(self._body_late, self.client_timeout - idle)
        elif not self.transport.is_closing():
            self.transport.close()  # the app sees a disconnect


def _has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b'content-length':
            return value.strip() not in (b'0', b'')
        if name == b'transfer-encoding':
            return True
    return False


def protocol_for(settings: Any) -> type[GuardedHttpProtocol]:
    """The protocol class with this configuration's limits (uvicorn takes a class, not an instance)."""
    attrs = {'client_timeout': settings.client_timeout, 'max_connections': settings.max_connections}
    return type('GuardedHttpProtocol', (GuardedHttpProtocol,), attrs)


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """What `uvicorn.Config` (or `ui.run`) gets from the settings: the guarded protocol, and TLS when set."""
    options: dict[str, Any] = {'http': protocol_for(settings), 'h11_max_incomplete_event_size': MAX_HEADER_BYTES}
    if settings.ssl_certfile and settings.ssl_keyfile:
        options |= {'ssl_certfile': str(settings.ssl_certfile), 'ssl_keyfile': str(settings.ssl_keyfile)}
    return options
