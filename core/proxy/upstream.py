"""A lean keep-alive HTTP/1.1 client for the proxy's data path: httptools' parser on asyncio transports.

Why not aiohttp here: at concurrency 1 the proxy's added latency is its CPU per request, and aiohttp's client
(URL objects, multidicts, request/response classes, a timer per request) took ~150 us of it against ~53 us for
this one (each sending the same requests in a loop of its own, same upstream, same run). This client
does only what relaying to llama-server needs: one pooled connection per request, the request head written
from the ASGI header list as bytes, the response parsed by llhttp (the parser uvicorn uses), body bytes handed
on as they arrive with backpressure. No redirects, cookies, proxies or decompression; no read timeout, since
prompt processing can take minutes. Control-plane calls (health polls, scrapes) keep using httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable

import httptools

CONNECT_TIMEOUT_S = 30.0
# A pooled connection unused this long is closed rather than reused: llama-server (cpp-httplib) closes a kept-alive
# connection after 5 s idle, and a request written into one it is closing costs a round trip and a retry.
IDLE_KEEP_S = 4.0
HIGH_WATER = 1 << 20  # bytes read ahead of the relay before the upstream socket is paused
MAX_IDLE_PER_HOST = 64
SSE = b'text/event-stream'
RETRY_PAUSES_S = (0.005, 0.02, 0.1)  # before each new try of a request a fresh connection dropped unanswered


_Key = tuple[str, int, 'ssl.SSLContext | None']  # host, port, TLS context (None: plain HTTP)


class UpstreamError(Exception):
    """The upstream could not be reached, or the connection broke or spoke bad HTTP."""


class Unreachable(UpstreamError):
    """No response at all: connect failed, or the connection closed before any byte of the response."""


class Lost(UpstreamError):
    """The connection broke (or the response was malformed) after the response had begun."""


def request_head(
    method: str, target: str, host: str, headers: Iterable[tuple[bytes, bytes]], body_len: int | None
) -> bytes:
    """The request line and headers. `headers` are ASGI (lower-case name, value) pairs already filtered."""
    parts = [f'{method} {target} HTTP/1.1\r\nhost: {host}\r\n'.encode('latin-1')]
    parts.extend(b'%s: %s\r\n' % (name, value) for name, value in headers)
    if body_len is not None:
        parts.append(b'content-length: %d\r\n' % body_len)
    parts.append(b'\r\n')
    return b''.join(parts)


class Response:
    """One upstream response. Read the body with `chunk()` until it returns b''; then `release()`, or `abort()`."""

    __slots__ = (
        '_buffered',
        '_chunks',
        '_conn',
        '_done',
        '_error',
        '_headers_done',
        '_waiter',
        'content_type',
        'headers',
        'keep_alive',
        'on_wake',
        'sink',
        'sse_sink',
        'status',
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.content_type = b''
        self.keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._headers_done = False
        self._done = False  # the whole message was parsed
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # `request(sse_sink=...)`: a reader that wants a 2xx event stream only as a whole (it assembles one reply
        # from it) gets each piece in `sink` from the protocol callback, and `request()` returns once the message
        # ended. No task wakes per network read, or for the headers; the work overlaps the wait for the rest.
        self.sse_sink: Callable[[bytes], None] | None = None  # offered
        self.sink: Callable[[bytes], None] | None = None  # taken: the response is a 2xx event stream
        # A reader with no task (core/proxy/fastlane.py) is called instead, from the protocol callback, whenever
        # a task would be woken: headers, body bytes, the end, a failure.
        self.on_wake: Callable[[], None] | None = None

    # ---- fed by the connection -----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._wake()

    # ---- read by the relay ---------------------------------------------------------------------------------
    async def _wait(self) -> None:
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _headers(self) -> None:
        """Until the headers came (with a sink taken: until the whole message did)."""
        while not self._headers_done or (self.sink is not None and not self._done):
            if self._error is not None:
                raise self._error
            await self._wait()

    async def chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some), or b'' at the end."""
        while not self._chunks:
            if self._done:
                return b''
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.take()

    def take(self) -> bytes:
        """The body bytes that arrived since the last call, without waiting (b'' when none did)."""
        data = self._chunks[0] if len(self._chunks) == 1 else b''.join(self._chunks)
        self._chunks.clear()
        if self._buffered > HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    @property
    def error(self) -> UpstreamError | None:
        return self._error

    async def read(self) -> bytes:
        parts = []
        while data := await self.chunk():
            parts.append(data)
        return b''.join(parts)

    @property
    def complete(self) -> bool:
        return self._done

    @property
    def unread(self) -> bool:
        """Body bytes arrived that `take()` or `chunk()` has not returned yet."""
        return bool(self._chunks)

    @property
    def drained(self) -> bool:
        """The message is complete and every byte of it was read: the next `chunk()` returns b''."""
        return self._done and not self._chunks and self._error is None

    def release(self) -> None:
        """Done with it: the connection goes back to the pool when the message ended cleanly, else it is closed.
        Never after an event stream: llama-server closes the connection then, though its headers say keep-alive,
        and a request sent before its FIN arrives would be lost and tried again."""
        reuse = self._done and self.keep_alive and not self._chunks and not self.content_type.startswith(SSE)
        self._conn.finish(reuse=reuse)

    def abort(self) -> None:
        """Drop the connection with a reset, not a FIN: llama-server's next write (a token, or a progress chunk
        after each prompt batch) then fails at once and it cancels the task, freeing the slot."""
        self._conn.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamClient, key: _Key, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.key, self.loop = pool, key, loop
        self.max_idle = MAX_IDLE_PER_HOST  # set per request: how many idle connections the pool may keep there
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self.head_only = False  # a HEAD request: the response has headers only

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # nothing was asked: a server talking out of turn is not reused
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            resp._fail(Lost(f'malformed response from upstream: {e}'))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        resp = self.response
        if resp is None or resp._done:
            return
        if resp._headers_done and not resp.keep_alive and not self._framed(resp):
            resp._done = True  # a body delimited by the close itself (no length, not chunked)
            resp._wake()
        elif self.received:
            resp._fail(Lost(f'upstream closed the connection mid-response ({exc or "EOF"})'))
        else:
            resp._fail(Unreachable(f'upstream closed the connection before answering ({exc or "EOF"})'))

    def pause_writing(self) -> None:  # large request bodies: the transport buffers them; nothing to throttle
        pass

    # ---- httptools callbacks -------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        name = name.lower()
        self.response.headers.append((name, value))
        if name == b'content-type':
            self.response.content_type = value

    def on_headers_complete(self) -> None:
        resp = self.response
        assert resp is not None
        resp.status = self.parser.get_status_code()
        resp.keep_alive = self.parser.should_keep_alive()
        resp._headers_done = True
        if self.head_only:
            resp._done = True
            resp.keep_alive = False  # llhttp cannot be told this response has no body: never reuse
        elif resp.sse_sink is not None and resp.status < 300 and resp.content_type.startswith(SSE):
            resp.sink = resp.sse_sink
            return  # the reader waits for the end
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.response
        assert resp is not None
        if resp.sink is not None:
            try:
                resp.sink(body)
            except Exception as e:
                resp._fail(Lost(f'unreadable response from upstream: {e!r}'))
            return
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp._wake()

    def on_message_complete(self) -> None:
        resp = self.response
        assert resp is not None
        resp._done = True
        resp._wake()

    # ---- used by the pool and the response -----------------------------------------------------------------
    @staticmethod
    def _framed(resp: Response) -> bool:
        return any(name in (b'content-length', b'transfer-encoding') for name, _ in resp.headers)

    def send(self, head: bytes, body: bytes, head_only: bool) -> Response:
        assert self.transport is not None
        self.response = resp = Response(self)
        self.received = False
        self.head_only = head_only
        if body and len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            if body:
                self.transport.write(body)
        return resp

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def finish(self, reuse: bool) -> None:
        self.response = None
        if reuse and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.resume()
            self.parser = httptools.HttpResponseParser(self)
            self.idle_since = time.monotonic()
            self.pool._park(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        sock = transport.get_extra_info('socket')
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        transport.abort()


class UpstreamClient:
    """A pool of keep-alive connections per (host, port); one request at a time on each."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT_S, idle_keep: float = IDLE_KEEP_S) -> None:
        self.connect_timeout = connect_timeout
        self.idle_keep = idle_keep
        self._idle: dict[_Key, list[_Connection]] = {}
        self.closed = False

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b'',
        sse_sink: Callable[[bytes], None] | None = None,
        max_idle: int = MAX_IDLE_PER_HOST,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float | None = None,
    ) -> Response:
        """Send one request and wait for the response's status and headers. Raises Unreachable or Lost.

        `max_idle`: once the response is released, its connection is kept for reuse only while fewer than this
        many wait idle for that host. cpp-httplib serves each kept-alive connection on a thread of its own, and
        llama-server has `-np` + 2 of them: a pool of more than `-np` idle connections would leave none for the
        health check and the metrics scrape.

        With `sse_sink`, a 2xx `text/event-stream` body is handed to it piece by piece (see `Response`) and this
        returns when it ended; `response.sink` is then set. Any other response is returned at its headers.

        A connection closed before a single byte of the response came never had the request taken: a pooled one
        the server closed meanwhile (idle keep-alive timeout) is replaced at once; a fresh one (llama-server
        closes new connections while all its HTTP threads are busy) is tried again after a short pause, up to
        `len(RETRY_PAUSES_S)` times. A refused connect is not retried: nothing listens.

        `tls`: HTTPS with this context (a remote upstream); its connections are pooled apart from plain ones."""
        key = (host, port, tls)
        sized = bool(body) or method not in ('GET', 'HEAD', 'DELETE', 'OPTIONS')
        head = request_head(method, target, f'{host}:{port}', headers, len(body) if sized else None)
        pauses = iter(RETRY_PAUSES_S)
        while True:
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, connect_timeout or self.connect_timeout)
            conn.max_idle = max_idle
            resp = conn.send(head, body, method == 'HEAD')
            resp.sse_sink = sse_sink
            try:
                await resp._headers()
            except Unreachable:
                conn.abort()
                if reused:
                    continue  # bounded: each turn takes one connection out of the pool
                pause = next(pauses, None)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
                continue
            except BaseException:
                conn.abort()
                raise
            return resp

    def send_now(
        self, host: str, port: int, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes, max_idle: int
    ) -> Response | None:
        """POST on an idle pooled connection at once, with no task: the response is read through its `on_wake`.
        None when no connection is idle (then `request()` opens one). A pooled connection that the server closed
        unanswered shows as an `Unreachable` error on the response: the request was not taken, so it may be sent
        again the usual way."""
        conn = self._take((host, port, None))
        return None if conn is None else _post(conn, host, port, target, headers, body, max_idle)

    async def send_fresh(
        self, host: str, port: int, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes, max_idle: int
    ) -> Response:
        """`send_now` on a new connection: the response is read through its `on_wake`. Raises Unreachable when
        the connect fails; a connection closed unanswered shows as an `Unreachable` error on the response."""
        conn = await self._connect((host, port, None), self.connect_timeout)
        return _post(conn, host, port, target, headers, body, max_idle)

    async def _connect(self, key: _Key, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port, tls = key
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key, loop), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise Unreachable(f'connecting to {host}:{port} timed out after {timeout:g} s') from None
        except ssl.SSLError as e:
            raise Unreachable(f'TLS with {host}:{port} failed: {e.reason or e}') from None
        except OSError as e:
            raise Unreachable(f'cannot connect to {key[0]}:{key[1]}: {e.strerror or e}') from None
        return conn

    def _take(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        stale = time.monotonic() - self.idle_keep
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
            if not conn.closed and conn.idle_since >= stale:
                return conn
            conn.close()
        return None

    def _park(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self.closed or len(idle) >= min(conn.max_idle, MAX_IDLE_PER_HOST):
            conn.close()
        else:
            idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:  # a stopped server's port is not asked for again
                del self._idle[conn.key]

    def idle_count(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        return len(self._idle.get((host, port, tls), ()))

    async def close(self) -> None:
        """Close the pooled connections; connections in use close when their responses are released."""
        self.closed = True
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


def _post(
    conn: _Connection,
    host: str,
    port: int,
    target: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    max_idle: int,
) -> Response:
    """Write a POST on `conn` now (`send_now`, `send_fresh`): its response is read through its `on_wake`."""
    conn.max_idle = max_idle
    return conn.send(request_head('POST', target, f'{host}:{port}', headers, len(body)), body, False)
