"""Slow and greedy clients, stopped where uvicorn reads the socket.

uvicorn times out only idle keep-alive connections: headers sent at a byte a second, or a body that stops half
way, hold a connection (and a task waiting on `receive()`) for ever, and every such connection is kept. This
protocol (uvicorn's httptools one, plus three checks) closes a new connection that sends nothing for 5 s, one
whose request headers are not complete within `client_timeout` of their first byte, or whose body makes no progress
for that long
while the app is reading it; answers 431 to headers over `MAX_HEADER_BYTES` (counted as they arrive, since
httptools buffers a header line whole before it says anything); and refuses connections beyond
`max_connections`. A closed connection is a disconnect to the app, so the proxy cancels what it had started.
Per request it costs a timer armed and cancelled (two with a body) and a call per header line
(`bench/ab_commits.sh`, in docs/BENCHMARKS.md "Perimeter checks": ~7 us with the other perimeter checks).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

if TYPE_CHECKING:
    from core.frontdoor import Scope
    from core.proxy.fastlane import FastLane, LaneRequest

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # request line and headers; uvicorn's h11 default is 16 KiB, llama-server's 8 KiB
FIRST_BYTE_S = 5.0  # a new connection that sends nothing: a browser's preconnect is used within a second or two
WARN_EVERY_S = 10.0  # a flood of refused connections is one log line per this, not one per connection
_TOO_LARGE = b'HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n'


class _LaneCycle:
    """Stands in for uvicorn's request cycle while the fast lane serves a request: a pipelined request waits for
    it, a shutdown lets it finish, a disconnect is told to it."""

    __slots__ = ('disconnected', 'keep_alive', 'message_event', 'response_complete', 'scope')

    def __init__(self, scope: Scope) -> None:
        self.scope, self.response_complete, self.keep_alive, self.disconnected = scope, False, True, False
        self.message_event = self  # uvicorn sets it on a disconnect

    def set(self) -> None:
        pass


class GuardedHttpProtocol(HttpToolsProtocol):
    client_timeout = 30.0
    max_connections = 1000
    fast_lane: FastLane | None = None  # core/proxy/fastlane.py: plain /v1 requests served with no ASGI task

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: Scope | None = None  # a request held back for the lane until its body is in
        self._held_body: list[bytes] = []
        self._lane: LaneRequest | None = None  # the lane's request in flight on this connection
        self._lane_cycle: _LaneCycle | None = None
        self._lane_head: tuple[int, list[tuple[bytes, bytes]]] | None = None  # a stream's, until its first piece
        # The cycle still answering once a pipelined request took `self.cycle` (uvicorn tells a disconnect to
        # `self.cycle` only, so a stream running ahead of a pipelined request would never hear its client leave).
        self._ahead: RequestResponseCycle | None = None
        self._last_request = False  # a graceful shutdown came while a held body was arriving: answer it, then close
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # from a request's first byte (or the connection) to its headers' end
        self._between = True  # no request is being read: the connection is new, or the last one was whole
        self._first_byte = True  # nothing received yet: the timer is the short FIRST_BYTE_S one
        self._header_bytes = 0  # of the complete lines of this request's head
        self._flood = 0  # bytes received while this request's head is incomplete
        self._body_at = 0.0  # loop time of the last body bytes while a body is expected

    _warned_at = -WARN_EVERY_S
    _refused = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            cls = GuardedHttpProtocol
            cls._refused += 1
            if self.loop.time() - cls._warned_at >= WARN_EVERY_S:
                self.logger.warning(
                    'refused %d connection(s): %d open (max_connections)', cls._refused, len(self.connections) - 1
                )
                cls._warned_at, cls._refused = self.loop.time(), 0
            transport.abort()
            return
        self._arm(self._headers_late, min(FIRST_BYTE_S, self.client_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.client_gone()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead is not self.cycle and not ahead.response_complete:
            ahead.disconnected = True
            ahead.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._between and not self._in_headers:  # bytes after a whole request: the next head (or a stray CRLF)
            self._head_begins()
        if self._in_headers and (self._timer is None or self._first_byte):
            self._arm(self._headers_late)  # (the first byte replaces the short wait for it)
        self._first_byte = False
        super().data_received(data)  # cancels uvicorn's keep-alive timer; ours stays
        if self._in_headers:  # still no end of headers: a line that never ends is counted here
            self._flood += len(data)
            if self._flood > MAX_HEADER_BYTES:
                self._refuse()

    def on_response_complete(self) -> None:
        if self._ahead is not None and self._ahead.response_complete:
            self._ahead = None
        super().on_response_complete()

    def _head_begins(self) -> None:
        self._in_headers, self._header_bytes, self._flood = True, 0, 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._between and not self._in_headers:  # a pipelined request in the same read
            self._head_begins()
        self._between = False
        if self._timer is None:
            self._arm(self._headers_late)

    # Complete header lines are counted exactly (httptools reports a line once it has all of it).
    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        """431, closed: uvicorn starts no request on a closing transport."""
        if not self.transport.is_closing():
            self._disarm()
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_headers = False
        if self.fast_lane is not None and self._hold(self.fast_lane):
            self._body_at = self.loop.time()
            self._arm(self._body_late)
            return
        running = self.cycle
        super().on_headers_complete()
        if running is not self.cycle and isinstance(running, RequestResponseCycle) and not running.response_complete:
            self._ahead = running  # (the lane's stand-in is not one: the lane hears of a disconnect itself)
        if self.cycle is not None and self.cycle.scope is self.scope and not self.transport.is_closing():
            if _has_body(self.scope['headers']):
                self._body_at = self.loop.time()
                self._arm(self._body_late)

    def on_body(self, body: bytes) -> None:
        self._body_at = self.loop.time()
        if self._held is not None:
            self._held_body.append(body)  # no more than the declared length, which the lane allowed
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._between = True
        scope = self._held
        if scope is None:
            super().on_message_complete()
            return
        body = b''.join(self._held_body)
        self._held, self._held_body = None, []
        self._lane_cycle = _LaneCycle(scope)
        self._lane_cycle.keep_alive = not self._last_request
        self.cycle = self._lane_cycle  # type: ignore[assignment]  # uvicorn reads only what it has
        assert self.fast_lane is not None
        try:
            self._lane = self.fast_lane.serve(self, scope, body)
        except Exception as exc:  # the ASGI path answers it, errors included
            log.error('fast lane: %s', scope['path'], exc_info=exc)
        if self._lane is None:
            self.lane_hand_back(scope, body)

    def shutdown(self) -> None:
        """A graceful shutdown. uvicorn lets a request whose body is arriving finish (its cycle began at the
        headers) and closes idle connections; a body held for the lane has no cycle yet, so it is marked here."""
        if self._held is not None:
            self._last_request = True
            return
        super().shutdown()

    # ---- the fast lane (core/proxy/fastlane.py) -------------------------------------------------------------
    def _hold(self, lane: FastLane) -> bool:
        """Whether to hold this request back for the lane: a kept-alive HTTP/1.1 POST to a lane path with a
        declared body length (not chunked, no `Expect`), the connection serving nothing else."""
        parser = self.parser
        if self._lane is not None or self.expect_100_continue or self.transport.is_closing():
            return False
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined: uvicorn queues it
            return False
        if parser.get_method() != b'POST' or parser.get_http_version() != '1.1' or not parser.should_keep_alive():
            return False
        length = -1
        for name, value in self.headers:
            if name == b'content-length':
                length = int(value) if value.isdigit() else -1
            elif name == b'transfer-encoding':
                return False
        raw_path = httptools.parse_url(self.url)
        path = raw_path.path.decode('ascii')
        if '%' in path:
            path = urllib.parse.unquote(path)
        if self.flow.write_paused or not lane.wants(self.root_path + path, length):
            return False  # (a client not reading its answers waits in uvicorn's send, as before)
        scope: Scope = self.scope  # type: ignore[assignment]
        scope['method'], scope['path'] = 'POST', self.root_path + path
        scope['raw_path'] = self.root_path.encode('ascii') + raw_path.path
        scope['query_string'] = raw_path.query or b''
        if not lane.admits(scope):  # refused at the headers, as uvicorn would: its body is never held
            return False
        self._held = scope
        return True

    def lane_reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The lane's whole answer, as uvicorn would have written it; then the next request, as after any."""
        cycle = self._lane_cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            self._lane = None
            return
        out = self._head(status, headers, cycle)
        out += (b'content-length: %d\r\n\r\n' % len(body), body)
        self.transport.write(b''.join(out))
        self._lane_done(cycle)

    def lane_start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The head of a streamed answer: chunked, as uvicorn writes one with no length; written with the first
        piece of the body (one write less, and the client's first event comes with it)."""
        self._lane_head = (status, headers)

    def lane_chunk(self, data: bytes, last: bool) -> None:
        """A piece of the streamed answer; `last` ends it (then the next request, as after any)."""
        cycle = self._lane_cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            if last:
                self._lane = None
            return
        out = [b'%x\r\n' % len(data), data, b'\r\n'] if data else []
        if self._lane_head is not None:  # (its keep-alive as it is now: a shutdown may have come since)
            head = self._head(*self._lane_head, cycle)
            head.append(b'transfer-encoding: chunked\r\n\r\n')
            out[:0] = head
            self._lane_head = None
        if last:
            out.append(b'0\r\n\r\n')
        self.transport.write(b''.join(out))
        if last:
            self._lane_done(cycle)

    @property
    def writable(self) -> bool:
        return not self.flow.write_paused

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._lane is not None:
            self._lane.reading_again()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], cycle: _LaneCycle) -> list[bytes]:
        out = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            out += (name, b': ', value, b'\r\n')
        if not cycle.keep_alive:
            out.append(b'connection: close\r\n')
        return out

    def _lane_done(self, cycle: _LaneCycle) -> None:
        self._lane = None
        cycle.response_complete = True
        if not cycle.keep_alive:  # the server is shutting down
            self.transport.close()
        self.on_response_complete()  # (counted, as uvicorn counts every answer; then the next request, if open)

    def lane_hand_back(self, scope: Scope, body: bytes) -> bool:
        """Serve a held request the ASGI way: the cycle uvicorn would have made at its headers, body complete.
        False when the connection is closing (nothing to answer)."""
        lane_cycle, self._lane = self._lane_cycle, None
        if self.transport.is_closing():
            return False
        cycle = RequestResponseCycle(
            scope=scope,  # type: ignore[arg-type]
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=lane_cycle is None or lane_cycle.keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.body += body
        cycle.more_body = False
        cycle.message_event.set()  # as uvicorn's own on_message_complete does: receive() returns the body
        if self.cycle is lane_cycle:
            self.cycle = cycle
        else:  # a pipelined request came since, and waits for this one
            self._ahead = cycle
        self._start_asgi_task(cycle, self.app)
        return True

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
        if self._in_headers and not self.transport.is_closing():
            self.transport.close()

    def _body_late(self) -> None:
        self._timer = None
        idle = self.loop.time() - self._body_at
        if self.flow.read_paused:  # the app is not reading (busy, or a pipelined request waits): not the client
            self._body_at, idle = self.loop.time(), 0.0
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


def protocol_for(settings: Any, live: Any = None, fast_lane: FastLane | None = None) -> type[GuardedHttpProtocol]:
    """The protocol class with this configuration's limits (uvicorn takes a class, not an instance). With `live`
    (the SettingsManager), a saved change of the limits applies to the next connection and request."""
    attrs = {'client_timeout': settings.client_timeout, 'max_connections': settings.max_connections}
    attrs['fast_lane'] = fast_lane
    cls: type[GuardedHttpProtocol] = type('GuardedHttpProtocol', (GuardedHttpProtocol,), attrs)
    if live is not None:

        def follow(new: Any, changed: list[str]) -> None:
            cls.client_timeout, cls.max_connections = new.client_timeout, new.max_connections

        live.on_change(follow)
    return cls


def uvicorn_options(settings: Any, live: Any = None, fast_lane: FastLane | None = None) -> dict[str, Any]:
    """What `uvicorn.Config` (or `ui.run`) gets from the settings: the guarded protocol (with the proxy's fast
    lane, if given), and TLS when set."""
    options: dict[str, Any] = {'http': protocol_for(settings, live, fast_lane)}
    if settings.ssl_certfile and settings.ssl_keyfile:
        options |= {'ssl_certfile': str(settings.ssl_certfile), 'ssl_keyfile': str(settings.ssl_keyfile)}
    return options
