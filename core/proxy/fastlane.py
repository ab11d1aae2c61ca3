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
from core.proxy.service import _DROP_RESPONSE, _gateway_error, _record_end, _request_headers
from core.proxy.upstream import Response, Unreachable

if TYPE_CHECKING:
    from core.proxy.service import Proxy
    from core.supervisor.process import ServerProcess

log = logging.getLogger(__name__)

LANE_ROUTES: dict[str, RouteSpec] = {'/v1/chat/completions': CHAT, '/v1/completions': TEXT, '/v1/embeddings': PLAIN}
_DROP = _DROP_RESPONSE | {b'content-length'}


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
        if proxy._per_model.get(model_id, 0) >= proxy.config.settings.concurrency_limit:
            return None
        spec = self.routes[scope['path']]
        try:
            upstream_body, assemble = proxy._upstream_body(body, data, spec, model_id, False)
        except ProxyError:  # the client's error (e.g. nesting too deep to write again): the ASGI path says so
            return None
        if assemble:
            return None
        proc = proxy.scheduler.lease_ready(model_id)
        if proc is None:
            return None
        resp = None
        try:
            up = proc.upstream()
            if up.pid and up.tls is None and up.response_timeout is None:  # this machine's llama-server
                qs = scope.get('query_string') or b''
                target = scope['path'] + ('?' + qs.decode('latin-1') if qs else '')
                headers = _request_headers(scope, upstream_body, up.headers)
                resp = proxy._client().send_now(up.host, up.port, target, headers, upstream_body, up.slots)
        finally:
            if resp is None:  # no idle connection yet (the ASGI path opens and pools one), or a failure
                proxy.scheduler.release(proc)
        if resp is None:
            return None
        client = scope.get('client')
        rec = proxy.activity.begin(client[0] if client else '', scope['path'], 'POST')
        rec.model = model_id
        proxy._per_model[model_id] = proxy._per_model.get(model_id, 0) + 1
        proxy.activity.announce(rec)
        proxy.slot_time.serving(model_id, up.pid)
        self.taken += 1
        return LaneRequest(self, conn, scope, body, rec, proc, resp)


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
        self.lane, self.conn, self.scope, self.body, self.rec, self.proc, self.resp = (
            lane,
            conn,
            scope,
            body,
            rec,
            proc,
            resp,
        )
        self.sent = time.perf_counter() - rec.t0
        self.parts: list[bytes] = []
        self._ended = False
        rec.task = self
        resp.on_wake = self._on_wake

    # ---- for an operator's cancel (`Activity.cancel`) ------------------------------------------------------
    def done(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        if self._ended:
            return
        reason = f'cancelled ({self.rec.cancelled_by or "operator"})'
        self.resp.abort()
        self.rec.status, self.rec.error = CLIENT_CLOSED, reason
        err = ProxyError(503, f'request {reason}', 'cancelled', 'cancelled')
        self._end()
        self._reply(err.status, [(b'content-type', JSON)], err.body())

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
                    self._fail(_gateway_error(self.rec.model or '', error))
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
        headers = [h for h in resp.headers if h[0] not in _DROP and not h[0].startswith(b'access-control-')]
        resp.release()
        rec.status = resp.status
        self._reply(resp.status, headers, body)
        _record_end(rec, resp.status, body, True, False, self.sent, time.perf_counter() - rec.t0)
        self._end()

    def _fail(self, err: ProxyError) -> None:
        self.resp.abort()
        self.rec.status, self.rec.error = err.status, err.message
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
            self.lane.proxy.activity.finish(self.rec)

    def _release(self) -> None:
        if self._ended:
            return
        self._ended = True
        proxy, model_id = self.lane.proxy, self.proc.model_id
        proxy._per_model[model_id] -= 1
        proxy.scheduler.release(self.proc)

    def _end(self) -> None:
        """The bookkeeping every ending shares (`Proxy._serve`'s `finally`)."""
        self._release()
        rec, proxy = self.rec, self.lane.proxy
        rec.task = None
        if rec.gen_tps and (rec.completion_tokens or 0) > 1:
            proxy.slot_time.observe(rec.model or '', rec.prompt_tps, rec.gen_tps)
        proxy.activity.finish(rec)
