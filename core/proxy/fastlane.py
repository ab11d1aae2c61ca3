"""The fast lane: a plain `/v1` request to a model that is ready now, served from the HTTP protocol's callbacks.

The ASGI path costs a task, a scope's worth of message dicts and several sends per request; against a real
llama-server at concurrency 4 (`-np 4`, the tiny model) that left the proxy at 61-75 % of direct req/s, where
`bench/bare_proxy.py`, the same work done in protocol callbacks alone, got 91-116 % in the same runs (nginx: 81-105 %;
`bench/proxy_overhead.py --bare`). So the commonest request takes a lane with no task: core/httpguard.py's protocol
holds back a POST to one of `LANE_ROUTES` with a declared length until its body is in, and offers it here. The
lane runs the front door's guards on it (once: a request handed on is not checked again), reads the body and takes
it only when nothing but a relay is left to do: a non-streaming request (one `slot_time` calls quick, so it is not
assembled from a stream), naming a local model whose server is ready now, under its `concurrency_limit`, with an
idle kept-alive connection to that server. It is written there at once, and the answer, read in the upstream
protocol's callback (`Response.on_wake`), is written to the client whole, in one write. Everything else (an error
to answer, a model to load or to find elsewhere, a stream) goes the ASGI way as it would have.

The lane keeps what the ASGI path guarantees: the same record (begun, announced, finished; token counts from the
answer), the same lease and per-model count, a client disconnect resets the upstream connection (llama-server
stops), an operator's cancel answers 503, and a pooled connection the server closed unanswered sends the request
the ASGI way (its retries, its restart handling) with the record carried over.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from core.frontdoor import GUARDED, RESPONSE_HEADERS, FrontDoor, Scope
from core.proxy import jsonio
from core.proxy.activity import CARRIED, CLIENT_CLOSED, RequestRecord
from core.proxy.asgi import JSON
from core.proxy.errors import ProxyError
from core.proxy.routes import CHAT, PLAIN, TEXT, RouteSpec
from core.proxy.service import gateway_error, record_end, relayed_headers, request_headers, upstream_target
from core.proxy.upstream import Response, Unreachable

if TYPE_CHECKING:
    from core.proxy.service import Proxy
    from core.supervisor.process import ServerProcess

log = logging.getLogger(__name__)

LANE_ROUTES: dict[str, RouteSpec] = {'/v1/chat/completions': CHAT, '/v1/completions': TEXT, '/v1/embeddings': PLAIN}


class LaneConnection(Protocol):
    """The client's connection, as the lane uses it (core/httpguard.py)."""

    def lane_reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write the whole answer; the connection then serves its next request."""

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
        try:
            data = jsonio.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get('stream'):
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
        spec = self.routes[scope['path']]
        try:
            upstream_body, assemble = proxy._upstream_body(body, data, spec, model_id, False)
        except ProxyError:  # the client's error (e.g. nesting too deep to write again): the ASGI path says so
            return None
        if assemble:
            return None
        if not proxy.count_in(model_id):  # at its concurrency_limit: the ASGI path answers 429
            return None
        proc = proxy.scheduler.lease_ready(model_id)
        resp = None
        try:
            if proc is not None:
                resp = self._send(proc, scope, upstream_body)
        finally:
            if resp is None:  # not ready, no idle connection yet (the ASGI path opens and pools one), or a failure
                proxy.count_out(model_id)
                if proc is not None:
                    proxy.scheduler.release(proc)
        if resp is None or proc is None:
            return None
        client = scope.get('client')
        rec = proxy.activity.begin(client[0] if client else '', scope['path'], 'POST')
        rec.model = model_id
        proxy.activity.announce(rec)
        self.taken += 1
        return LaneRequest(self, conn, scope, body, rec, proc, resp)

    def _send(self, proc: ServerProcess, scope: Scope, body: bytes) -> Response | None:
        """Written at once on an idle pooled connection to this machine's llama-server; None if there is none."""
        up = proc.upstream()
        if not up.pid or up.tls is not None or up.response_timeout is not None:
            return None
        self.proxy.slot_time.serving(proc.model_id, up.pid)  # (a new server: the speeds seen on the old one go)
        headers = request_headers(scope, body, up.headers)
        return self.proxy._client().send_now(
            up.host, up.port, upstream_target(scope, scope['path']), headers, body, up.slots
        )


class LaneRequest:
    """One request in the lane, from the write to llama-server to the answer (or a disconnect, or a cancel)."""

    __slots__ = ('_ended', 'body', 'conn', 'lane', 'parts', 'proc', 'rec', 'resp', 'scope', 'sent')

    def __init__(
        self,
        lane: FastLane,
        conn: LaneConnection,
        scope: Scope,
        body: bytes,
        rec: RequestRecord,
        proc: ServerProcess,
        resp: Response,
    ) -> None:
        self.lane, self.conn, self.scope, self.body = lane, conn, scope, body
        self.rec, self.proc, self.resp = rec, proc, resp
        self.sent = time.perf_counter() - rec.t0
        self.parts: list[bytes] = []
        self._ended = False
        rec.task = self
        resp.on_wake = self._on_wake

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
        self.resp.abort()
        self.rec.status, self.rec.error = CLIENT_CLOSED, 'client disconnected'
        self._end()

    # ---- from the upstream connection ----------------------------------------------------------------------
    def _on_wake(self) -> None:
        if self._ended:
            return
        try:
            resp = self.resp
            error = resp.error
            if error is not None:
                resp.abort()
                if isinstance(error, Unreachable):  # not taken by the server: the ASGI path sends it again
                    self._hand_back()
                else:
                    self._fail(gateway_error(self.rec.model or '', error))
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
        self.parts.append(resp.take())
        body = b''.join(self.parts)
        headers = [h for h in relayed_headers(resp.headers) if h[0] != b'content-length']  # (written anew)
        resp.release()
        rec.status = resp.status
        self._reply(resp.status, headers, body)
        record_end(rec, resp.status, body, True, False, self.sent, time.perf_counter() - rec.t0)
        self._end()

    def _fail(self, err: ProxyError, status: int | None = None, reason: str | None = None) -> None:
        """Answer `err`; recorded as it (or as `status`, `reason`: a cancel is the client's, not an error)."""
        self.resp.abort()
        self.rec.status, self.rec.error = status or err.status, reason or err.message
        self._end()
        self._reply(err.status, [(b'content-type', JSON)], err.body())

    def _reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        extra = self.scope.get(RESPONSE_HEADERS)
        self.conn.lane_reply(status, headers + extra if extra else headers, body)

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
