"""The fast lane: a `/v1` request to a model that is ready now, served from the HTTP protocol's callbacks.

The ASGI path costs a task, a scope's worth of message dicts and several sends per request; against a real
llama-server at concurrency 4 (`-np 4`, the tiny model) that left the proxy at 61-75 % of direct req/s, where
`bench/bare_proxy.py`, the same work done in protocol callbacks alone, got 91-116 % in the same runs (nginx: 81-105 %;
`bench/proxy_overhead.py --bare`). So the commonest requests take a lane with no task: core/httpguard.py's protocol
holds back a POST to one of `LANE_ROUTES` with a declared length until its body is in, and offers it here. The
lane runs the front door's guards on it (once: a request handed on is not checked again), reads the body and takes
it only when nothing but a relay is left to do: a request naming a local model whose server is ready now, under its
`concurrency_limit`, not to be assembled from a stream (`slot_time` calls it quick), with an idle kept-alive
connection to that server, or for a stream a new one (llama-server closes a stream's connection, so streams leave
none idle). It is written there at once, and the answer, read in the upstream protocol's callback
(`Response.on_wake`), is written to the client whole, in one write; an event stream's reads are passed on as they
come, one chunk each, and wait while the client is not reading (past `HIGH_WATER`, llama-server's socket pauses).
Everything else (an error to answer, a model to load or to find elsewhere) goes the ASGI way as it would have.

The lane keeps what the ASGI path guarantees: the same record (begun, announced, finished; token counts from the
answer, a stream's first token dated), the same lease and per-model count, the same headers, a client disconnect
resets the upstream connection (llama-server stops), an operator's cancel answers 503 (mid-stream: a last `error`
event, as an upstream lost mid-stream does), and a connection the server closed unanswered sends the request the
ASGI way (its retries, its restart handling) with the record carried over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol, TypeAlias

from core.frontdoor import GUARDED, RESPONSE_HEADERS, FrontDoor, Scope
from core.proxy import jsonio
from core.proxy.activity import CARRIED, CLIENT_CLOSED, RequestRecord
from core.proxy.asgi import JSON
from core.proxy.errors import ProxyError
from core.proxy.routes import CHAT, PLAIN, TEXT, RouteSpec
from core.proxy.service import (
    Tally,
    gateway_error,
    record_end,
    relayed_headers,
    request_headers,
    stream_headers,
    upstream_target,
)
from core.proxy.upstream import SSE, Response, Unreachable

if TYPE_CHECKING:
    from core.proxy.service import Proxy
    from core.supervisor.process import ServerProcess

log = logging.getLogger(__name__)

# The upstream's response, or (a stream on a new connection) its coming.
Sent: TypeAlias = 'Response | Awaitable[Response]'

LANE_ROUTES: dict[str, RouteSpec] = {'/v1/chat/completions': CHAT, '/v1/completions': TEXT, '/v1/embeddings': PLAIN}


class LaneConnection(Protocol):
    """The client's connection, as the lane uses it (core/httpguard.py)."""

    def lane_reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write the whole answer; the connection then serves its next request."""

    def lane_start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Write the head of an answer whose body follows in chunks."""

    def lane_chunk(self, data: bytes, last: bool) -> None:
        """Write a piece of it; with `last` it ends, and the connection serves its next request."""

    @property
    def writable(self) -> bool:
        """Whether the client reads what it is sent (else the lane stops taking from llama-server until it
        does: its socket is paused once enough is buffered, and the lane is woken when the client catches up)."""

    def lane_hand_back(self, scope: Scope, body: bytes) -> bool:
        """Serve the request the ASGI way after all (its body already read); False if the connection closes."""


class FastLane:
    def __init__(self, proxy: Proxy, door: FrontDoor) -> None:
        self.proxy, self.door = proxy, door
        # Only paths the proxy itself serves at the front door (no other route took them over).
        self.routes = {p: spec for p, spec in LANE_ROUTES.items() if door.handler_for(p) == proxy.handle_v1}
        self.taken = 0  # requests the lane took (the tests' witness that it was used)

    def wants(self, path: str, length: int) -> bool:
        """Whether to hold a POST to `path` with this declared body length back for the lane."""
        return path in self.routes and 0 < length <= self.proxy.config.settings.max_body_bytes

    def admits(self, scope: Scope) -> bool:
        """The front door's guards, at the request's headers (before its body is held). Their answer is kept in
        the scope: the ASGI path answers a refusal, and checks (and rate-counts) nothing twice."""
        deny = scope[GUARDED] = self.door.denied(scope)
        return deny is None

    def serve(self, conn: LaneConnection, scope: Scope, body: bytes) -> LaneRequest | None:
        """Take the request (returning it in flight) or None: the caller serves it the ASGI way. `admits` has
        passed it."""
        proxy = self.proxy
        t0 = time.perf_counter()
        try:
            data = jsonio.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        spec = self.routes[scope['path']]
        stream = bool(data.get('stream'))
        if stream and not spec.generates:
            return None
        asked = data.get('model')
        if not isinstance(asked, str) or not asked:
            return None
        if proxy.remotes is not None and proxy.remotes.holders(asked):
            return None
        entry = proxy.library.get(asked)
        if entry is None or entry.error:
            return None
        model_id = entry.id
        try:
            upstream_body, assemble = proxy._upstream_body(body, data, spec, model_id, stream)
        except ProxyError:  # the client's error (e.g. nesting too deep to write again): the ASGI path says so
            return None
        if assemble:
            return None
        if not proxy.count_in(model_id):  # at its concurrency_limit: the ASGI path answers 429
            return None
        proc = proxy.scheduler.lease_ready(model_id)
        sent: Sent | None = None
        try:
            if proc is not None:
                sent = self._send(proc, scope, upstream_body, stream)
        finally:
            if sent is None:  # not ready, no idle connection yet (the ASGI path opens and pools one), or a failure
                proxy.count_out(model_id)
                if proc is not None:
                    proxy.scheduler.release(proc)
        if sent is None or proc is None:
            return None
        client = scope.get('client')
        rec = proxy.activity.begin(client[0] if client else '', scope['path'], 'POST')
        rec.model, rec.stream, rec.t0 = model_id, stream, t0  # (its clock from here, before the send)
        proxy.activity.announce(rec)
        self.taken += 1
        return LaneRequest(self, conn, scope, body, rec, proc, sent)

    def _send(self, proc: ServerProcess, scope: Scope, body: bytes, stream: bool) -> Sent | None:
        """Written at once on an idle pooled connection to this machine's llama-server; None if there is none. A
        stream is written on a new connection when none is idle (llama-server closes a stream's connection, so
        streams leave none behind): an awaitable of its response."""
        up = proc.upstream()
        if not up.pid or up.tls is not None or up.response_timeout is not None:
            return None
        self.proxy.slot_time.serving(proc.model_id, up.pid)  # (a new server: the speeds seen on the old one go)
        headers = request_headers(scope, body, up.headers)
        target = upstream_target(scope, scope['path'])
        pool = self.proxy._client()
        resp = pool.send_now(up.host, up.port, target, headers, body, up.slots)
        if resp is None and stream:
            return pool.send_fresh(up.host, up.port, target, headers, body, up.slots)
        return resp


class LaneRequest:
    """One request in the lane, from the write to llama-server to the answer (or a disconnect, or a cancel). A
    stream's events are passed on as they arrive, each in one write; any other answer is written whole."""

    __slots__ = (
        '_ended',
        '_opening',
        'body',
        'conn',
        'lane',
        'parts',
        'proc',
        'rec',
        'resp',
        'scope',
        'sent',
        'streaming',
        'tally',
    )

    def __init__(
        self,
        lane: FastLane,
        conn: LaneConnection,
        scope: Scope,
        body: bytes,
        rec: RequestRecord,
        proc: ServerProcess,
        sent: Sent,
    ) -> None:
        self.lane, self.conn, self.scope, self.body = lane, conn, scope, body
        self.rec, self.proc = rec, proc
        self.sent = time.perf_counter() - rec.t0
        self.parts: list[bytes] = []
        self._ended = False
        self.streaming = False  # the head of an event stream was written: what follows goes out in chunks
        self.tally = Tally(rec, True) if rec.stream else None  # (a plain answer is recorded whole, in `_answer`)
        rec.task = self
        self.resp: Response | None = None
        self._opening: asyncio.Future[None] | None = None
        if isinstance(sent, Response):
            self._attach(sent)
        else:  # a stream on a new connection: one task for the connect, none after it
            self._opening = asyncio.ensure_future(self._open(sent))

    def _attach(self, resp: Response) -> None:
        self.resp = resp
        resp.on_wake = self._on_wake

    async def _open(self, sent: Awaitable[Response]) -> None:
        try:
            resp = await sent
        except Unreachable:  # llama-server turned the new connection away (all its HTTP threads busy): the ASGI
            if not self._ended:  # path tries again, as it does for its own (unless a cancel came meanwhile)
                self._hand_back()
            return
        except Exception as exc:
            if not self._ended:
                log.error('fast lane: connecting for %s failed', self.rec.model, exc_info=exc)
                self._fail(ProxyError(500, f'internal error: {exc}', 'internal_error', 'internal_error'))
            return
        if self._ended:
            resp.abort()
        else:
            self._attach(resp)

    # ---- for an operator's cancel (`Activity.cancel`) ------------------------------------------------------
    def done(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        if not self._ended:
            reason = f'cancelled ({self.rec.cancelled_by or "operator"})'
            self._fail(ProxyError(503, f'request {reason}', 'cancelled', 'cancelled'), CLIENT_CLOSED, reason)

    # ---- from the client's connection ----------------------------------------------------------------------
    def client_gone(self) -> None:
        """The client closed its connection: reset llama-server's, which stops the task."""
        if self._ended:
            return
        self._abort()
        self.rec.status, self.rec.error = CLIENT_CLOSED, 'client disconnected'
        self._end()

    def reading_again(self) -> None:
        """The client reads again: pass on what llama-server sent meanwhile."""
        if self.resp is not None:
            self._on_wake()

    # ---- from the upstream connection ----------------------------------------------------------------------
    def _on_wake(self) -> None:
        resp = self.resp
        if self._ended or resp is None:
            return
        try:
            error = resp.error
            if error is not None and self.streaming and resp.unread:  # what came before the loss is the client's
                if not self.conn.writable:
                    return
                assert self.tally is not None
                self.conn.lane_chunk(self.tally.took(resp.take()), last=False)
            if error is not None:
                resp.abort()
                if isinstance(error, Unreachable):  # not taken by the server: the ASGI path sends it again
                    self._hand_back()
                else:
                    self._fail(gateway_error(self.rec.model or '', error))
            elif self.streaming or (self.rec.stream and resp.status and _is_stream(resp)):
                self._pass_on()
            elif resp.complete:
                self._answer()
            elif chunk := resp.take():  # a large answer: keep reading it
                self.parts.append(chunk)
        except Exception as exc:  # a bug here must not leave the client waiting
            log.error('fast lane: %s for %s failed', self.scope['path'], self.rec.model, exc_info=exc)
            if not self._ended:
                self._fail(ProxyError(500, f'internal error: {exc}', 'internal_error', 'internal_error'))

    def _answer(self) -> None:
        resp, rec = self.resp, self.rec
        assert resp is not None
        self.parts.append(resp.take())
        body = b''.join(self.parts)
        headers = [h for h in relayed_headers(resp.headers) if h[0] != b'content-length']  # (written anew)
        resp.release()
        rec.status = resp.status
        self._reply(resp.status, headers, body)
        record_end(rec, resp.status, body, True, False, self.sent, time.perf_counter() - rec.t0)
        self._end()

    def _pass_on(self) -> None:
        """An event stream, as `Proxy._pass_on` relays one: the same headers, each read passed on at once, the
        first token dated, the last events kept for the token counts."""
        resp, rec, tally = self.resp, self.rec, self.tally
        assert resp is not None and tally is not None
        if not self.streaming:
            self.streaming = True
            rec.status = resp.status
            headers = [h for h in stream_headers(resp.headers) if h[0] != b'content-length']  # (chunked here)
            self.conn.lane_start(resp.status, self._with_extra(headers))
        if not self.conn.writable:  # (`reading_again()` brings it back here)
            return
        chunk = tally.took(resp.take())
        if resp.complete:
            resp.release()
            self.conn.lane_chunk(chunk, last=True)
            tally.end(resp.status, self.sent)
            self._end()
        elif chunk:
            self.conn.lane_chunk(chunk, last=False)

    def _fail(self, err: ProxyError, status: int | None = None, reason: str | None = None) -> None:
        """Answer `err` (mid-stream: as a last `error` event, as the ASGI path does); recorded as it (or as
        `status`, `reason`: a cancel is the client's, not an error)."""
        self._abort()
        self.rec.status, self.rec.error = status or err.status, reason or err.message
        self._end()
        if self.streaming:
            self.conn.lane_chunk(b'event: error\ndata: ' + err.body() + b'\n\n', last=True)
        else:
            self._reply(err.status, [(b'content-type', JSON)], err.body())

    def _reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.conn.lane_reply(status, self._with_extra(headers), body)

    def _with_extra(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        extra = self.scope.get(RESPONSE_HEADERS)  # the front door's (CORS)
        return headers + extra if extra else headers

    def _abort(self) -> None:
        if self.resp is not None:
            self.resp.abort()
        opening = self._opening
        if opening is not None and not opening.done() and opening is not asyncio.current_task():
            opening.cancel()

    def _hand_back(self) -> None:
        self._release()
        self.rec.task = None
        self.scope[CARRIED] = self.rec
        if not self.conn.lane_hand_back(self.scope, self.body):  # the client is gone: the record ends here
            self.scope.pop(CARRIED, None)
            self.rec.status, self.rec.error = CLIENT_CLOSED, 'client disconnected'
            self.lane.proxy.finish_record(self.rec)

    def _release(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.lane.proxy.count_out(self.proc.model_id)
        self.lane.proxy.scheduler.release(self.proc)

    def _end(self) -> None:
        """The bookkeeping every ending shares (`Proxy._serve`'s `finally`)."""
        self._release()
        self.rec.task = None
        self.lane.proxy.finish_record(self.rec)


def _is_stream(resp: Response) -> bool:
    """A 2xx event stream (an error to a stream request is JSON, answered whole)."""
    return resp.status < 300 and resp.content_type.startswith(SSE)
