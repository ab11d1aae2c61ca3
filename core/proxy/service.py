"""The proxy: route by `model`, start it on demand, relay the answer as it arrives, record the request.

Served as raw ASGI handlers on the front door (before NiceGUI's middleware). One pool of keep-alive connections
(`upstream.UpstreamClient`, httptools-based) talks to every llama-server; there is no read timeout, since prompt
processing can take minutes. The client's `receive()` is watched from 2 ms after the body is read (most answers
are done by then), so a disconnect cancels the work also while the model loads or the prompt is processed; the
upstream connection is then reset, which is how llama-server learns to stop.

It learns it reliably only from a failed write, so only on a stream: a plain request's closed connection is seen
when llama-server's 1 s wait for that task's result times out, and any other result on the server (the metrics
scrape, another slot's tokens) restarts that wait (`bench/cancel_latency.py`). So a non-streaming generation that
may hold its slot longer than a moment (`slot_time`: no token limit, a long prompt, or more than 0.5 s at the
model's recent speed) is streamed from llama-server and assembled here, with `return_progress` so that a
disconnect stops it between prompt batches too; short ones, embeddings and the rest go as they came, on a
kept-alive connection. Assembling all of them cost +2.3 ms and 44 % of the throughput at c=4 against a real
llama-server, which closes the connection after every stream (`docs/BENCHMARKS.md`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote

from core import request_params
from core.auth import AuthGuard
from core.cors import CorsGuard
from core.frontdoor import Receive, Scope, Send
from core.proxy import jsonio
from core.proxy.activity import CARRIED, CLIENT_CLOSED, Activity, RequestRecord
from core.proxy.asgi import SSE_HEADERS, ClientGone, Reply, read_body, wait_disconnect
from core.proxy.errors import ProxyError, bad_gateway, bad_request, not_found, unavailable
from core.proxy.routes import DROP_REQUEST_HEADERS, DROP_RESPONSE_HEADERS, ROOT_PATHS, ROUTES, RouteSpec
from core.proxy.slot_time import SlotTime
from core.proxy.sse import Assembler, SSEObjects, json_usage, usage_payloads, usage_stats
from core.proxy.upstream import Lost, Response, Unreachable, UpstreamClient, UpstreamError
from core.remotes import FORWARDED, Remote, RemoteState
from core.remotes.placement import Place, ordered, remote_place
from core.supervisor.errors import ModelNotFound, ModelUnusable, NoCapacity, StartFailed
from core.supervisor.process import Upstream

MODEL_NAME_KEPT = 200  # of a model name a client asked for, in the request history

log = logging.getLogger(__name__)

TAIL_CHUNKS = 8  # last chunks kept to read `timings`/`usage` from once the stream ends
MAX_LISTED_IDS = 50
WATCH_AFTER_S = 0.002  # a disconnect is noticed this much later at most (the issue allows 100 ms)
_SSE_HEADER_NAMES = frozenset(name for name, _ in SSE_HEADERS)
_DROP_RESPONSE = frozenset(name.encode() for name in DROP_RESPONSE_HEADERS)
_DROP_REQUEST = frozenset(name.encode() for name in DROP_REQUEST_HEADERS)


class Proxy:
    def __init__(self, config: Any, scheduler: Any, library: Any, store: Any, bus: Any, remotes: Any = None) -> None:
        self.config, self.scheduler, self.library, self.store, self.bus = config, scheduler, library, store, bus
        self.remotes = remotes  # core.remotes.Remotes: models on other machines (None: this machine only)
        self.activity = Activity(store, bus, lambda: self.config.settings.requests_keep)
        self.auth = AuthGuard(config)
        self.cors = CorsGuard(config)
        self._upstream: UpstreamClient | None = None
        self._per_model: dict[str, int] = {}
        self.slot_time = SlotTime()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.activity.start()
        self._client()

    async def stop(self) -> None:
        for rec in list(self.activity._inflight.values()):
            self.activity.cancel(rec.id, by='shutdown')
        await self.activity.stop()
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None

    def _client(self) -> UpstreamClient:
        if self._upstream is None or self._upstream.closed:
            self._upstream = UpstreamClient()
        return self._upstream

    def register_routes(self, frontdoor: Any) -> None:
        """Register /v1/*, /upstream/* and the root llama-server paths, and the CORS and auth / Host guards."""
        frontdoor.guard(self.cors)  # first: preflights come without keys
        frontdoor.guard(self.auth)
        frontdoor.route('/v1/', self.handle_v1, prefix=True)
        frontdoor.route('/upstream/', self.handle_upstream, prefix=True)
        for path in ROOT_PATHS:
            frontdoor.route(path, self.handle_v1)

    # ---- reading -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return self.activity.stats()

    def models_list(self, local_only: bool = False) -> dict[str, Any]:
        """OpenAI list of every discovered model (not only loaded ones), with status and metadata; then the
        remotes' models (`owned_by`: the remote's name), unless `local_only` (a listing another node asked for)."""
        data = [self._model_card(e) for e in self.library.models() if not e.error]
        if self.remotes is not None and not local_only:
            seen = {card['id'] for card in data}
            for remote, model in self.remotes.listed():
                if model.id not in seen:
                    seen.add(model.id)
                    data.append(_remote_card(remote, model))
        return {'object': 'list', 'data': data}

    def _model_card(self, entry: Any) -> dict[str, Any]:
        meta = entry.meta
        info = self.scheduler.describe(entry.id)
        ctx = meta.get('context_length')
        caps = list(entry.capabilities or [])
        inputs = ['text', *(['image'] if 'vision' in caps or entry.mmproj else [])]
        return {
            'id': entry.id,
            'object': 'model',
            'created': int(entry.mtime),
            'owned_by': 'llama-async-proxy',
            'aliases': list(entry.aliases),
            'status': info.get('status'),
            'context_length': ctx,
            'size': entry.size_bytes,
            'capabilities': caps,
            'architecture': {
                'name': meta.get('architecture'),
                'input_modalities': inputs,
                'output_modalities': ['embedding'] if 'embedding' in caps else ['text'],
            },
            'meta': {
                'n_ctx': ctx,
                'n_ctx_train': ctx,
                'n_params': meta.get('n_params'),
                'n_embd': meta.get('embedding_length'),
                'n_vocab': meta.get('vocab_size'),
                'quantization': meta.get('file_type'),
                'size': entry.size_bytes,
            },
        }

    # ---- ASGI handlers -------------------------------------------------------------------------------------
    async def handle_v1(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope['path'], scope['method']
        if path in ('/v1/models', '/v1/models/') and method == 'GET':
            await Reply(send).json(200, self.models_list(local_only=_forwarded(scope)))
            return
        if path.startswith('/v1/models/') and method == 'GET':
            name = unquote(path[len('/v1/models/') :])
            entry = self.library.get(name)
            held = self.remotes.holders(name) if self.remotes is not None and not _forwarded(scope) else []
            if entry is not None and not entry.error:
                await Reply(send).json(200, self._model_card(entry))
            elif held:
                await Reply(send).json(200, _remote_card(*held[0]))
            else:
                await Reply(send).error(self._unknown_model(name))
            return
        spec = ROUTES.get(path)
        if spec is None:
            await Reply(send).error(not_found(f'no such endpoint: {method} {path}', 'unknown_endpoint'))
            return
        if method != 'POST':
            await Reply(send).error(
                ProxyError(405, f'{path} takes POST', 'invalid_request_error', 'method', headers={'Allow': 'POST'})
            )
            return
        await self._serve(scope, receive, send, spec, path, model_in_path=None)

    async def handle_upstream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`/upstream/{model}/{path}`: any method and path, passed through to that model's llama-server."""
        rest = scope['path'][len('/upstream/') :]
        parts = rest.split('/')
        for i in range(len(parts), 0, -1):  # ids may contain '/': the longest prefix naming a model wins
            name = '/'.join(parts[:i])
            if self.library.get(name) is not None:
                # The path as llama-server must see it: percent-encoded again, as it arrived.
                sub = quote('/' + '/'.join(parts[i:]), safe="/:@!$&'()*+,;=~")
                await self._serve(scope, receive, send, RouteSpec(), sub, model_in_path=name)
                return
        await Reply(send).error(self._unknown_model(parts[0] if parts else ''))

    async def serve_face(self, scope: Scope, receive: Receive, face: Face, spec: RouteSpec) -> None:
        """A request in another API's shape (Ollama's: core/ollama): `face` names the model and translates the
        body; it is then leased, relayed, recorded and cancelled on a disconnect like any /v1 request, with
        `face.reply` turning llama-server's answer into that API's shape."""
        await self._serve(scope, receive, None, spec, '', model_in_path=None, face=face)

    # ---- the request ---------------------------------------------------------------------------------------
    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send | None,
        spec: RouteSpec,
        upstream_path: str,
        model_in_path: str | None,
        face: Face | None = None,
    ) -> None:
        """One request, top to bottom: route it once, then lease its model, relay the answer, record it. `send`
        is None for a face, which brings its own reply."""
        if face is not None:
            reply: Reply = face.reply
        else:
            assert send is not None
            reply = Reply(send)
        rec = scope.pop(CARRIED, None)  # begun in the fast lane, which handed the request on
        if rec is None:
            client = scope.get('client')
            rec = self.activity.begin(client[0] if client else '', scope['path'], scope['method'])
        try:
            if face is not None:
                call = await self._route_face(scope, receive, reply, rec, spec, face)
            else:
                call = await self._route(scope, receive, reply, rec, spec, upstream_path, model_in_path)
            with self._admitted(call):
                self.activity.announce(rec)
                async with self._watching(call):
                    await self._lease_and_relay(call)
        except ProxyError as e:
            rec.status, rec.error = e.status, e.message
            await _tell(reply, rec, e, gone_is_recorded=True)
        except _Cancelled as c:
            rec.status, rec.error = CLIENT_CLOSED, c.reason
            if c.by != 'client':
                await _tell(reply, rec, ProxyError(503, f'request {c.reason}', 'cancelled', 'cancelled'))
        except ClientGone:
            rec.status, rec.error = CLIENT_CLOSED, 'client disconnected'
        except Exception as exc:
            log.error('proxying %s for %s failed', upstream_path, rec.model, exc_info=exc)
            rec.status, rec.error = 500, f'internal error: {exc}'
            await _tell(reply, rec, ProxyError(500, rec.error, 'internal_error', 'internal_error'))
        finally:
            if face is not None:
                face.finished(rec)
            self.finish_record(rec)

    def finish_record(self, rec: RequestRecord) -> None:
        """A request's end, however it was served (here or in the fast lane): the model's speed learnt from a
        local generation, the record finished."""
        if rec.gen_tps and (rec.completion_tokens or 0) > 1 and rec.upstream is None:
            self.slot_time.observe(rec.model or '', rec.prompt_tps, rec.gen_tps)
        self.activity.finish(rec)

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        reply: Reply,
        rec: RequestRecord,
        spec: RouteSpec,
        upstream_path: str,
        model_in_path: str | None,
    ) -> _Call:
        """Read and check the body, find the model, and build what llama-server is sent. Raises ProxyError."""
        body = await read_body(scope, receive, self.config.settings.max_body_bytes)
        if model_in_path is None:
            data = _parse_json(body)
            asked = data.get('model')
            rec.model = asked[:MODEL_NAME_KEPT] if isinstance(asked, str) else None  # a failure names what was asked
            stream = bool(data.get('stream'))
            held = self.remotes.holders(asked) if self.remotes is not None and isinstance(asked, str) else None
            entry, elsewhere = await self._placed(scope, asked, held) if held else (self._resolve(asked), [])
            if elsewhere:  # another machine first: its answer is passed on as it comes
                target = upstream_target(scope, upstream_path)
                rec.stream = stream
                return _Call(
                    scope,
                    receive,
                    reply,
                    rec,
                    spec,
                    asked,
                    target,
                    body,
                    stream,
                    False,
                    remotes=elsewhere,
                    data=data,
                    fallback=entry,
                )
            body, assemble = self._upstream_body(body, data, spec, entry.id, stream)
        else:
            rec.model = model_in_path[:MODEL_NAME_KEPT]
            entry = self.library.get(model_in_path)
            if entry is None:
                raise self._unknown_model(model_in_path)
            if entry.error:
                raise _unusable(entry.id, entry.error)
            if body.lstrip()[:1] in (b'{', b'['):
                # Passed on as it came, but parsed once: 100k levels of nesting crash llama-server (SIGSEGV).
                _parse_json(body, object_only=False)
            stream = assemble = False
        rec.model, rec.stream = entry.id, stream
        target = upstream_target(scope, upstream_path)
        return _Call(scope, receive, reply, rec, spec, entry.id, target, body, stream, assemble)

    async def _route_face(
        self, scope: Scope, receive: Receive, reply: Reply, rec: RequestRecord, spec: RouteSpec, face: Face
    ) -> _Call:
        body = await read_body(scope, receive, self.config.settings.max_body_bytes)
        data = _parse_json(body)
        asked = face.model_name(data)
        rec.model = asked[:MODEL_NAME_KEPT] if isinstance(asked, str) else None
        if not asked:  # unlike a llama-server client, an Ollama one always names it: no guessing
            raise bad_request('the request names no "model"', 'missing_model')
        entry = self._resolve(asked, also=face.name_candidates)
        target, upstream = face.translate(data, entry)
        if spec.generates:
            upstream = request_params.apply(
                upstream, request_params.for_model(self.config.settings, entry.id), spec.max_tokens_field
            )
        rec.model, rec.stream = entry.id, face.client_stream
        return _Call(
            scope, receive, reply, rec, spec, entry.id, target, _dumps(upstream), face.client_stream, False, face
        )

    async def _placed(self, scope: Scope, asked: str, held: list[tuple[Remote, Any]]) -> tuple[Any, list[Place]]:
        """The local model for `asked`, which the remotes in `held` list too, and the remotes to try first, in
        order (empty: serve it here). A forwarded request never looks further. (A name no remote lists does not
        come here: the local path stays as short as it was.)"""
        if _forwarded(scope):
            return self._resolve(asked), []
        entry = self.library.get(asked)
        if entry is not None and entry.error:
            entry = None
        # A name this app has too competes only with nodes (replicas); an OpenAI server's same name stays second.
        places = [remote_place(r, m) for r, m in held if r.up and (entry is None or r.params.kind == 'node')]
        if entry is not None and not places:
            return entry, []
        if not places:
            downs = '; '.join(f'{r.name} ({r.error or r.state})' for r, _ in held)
            raise unavailable(
                f'model {asked!r} is served by a remote that is not reachable now: {downs}; it is checked again '
                'every few seconds',
                'remote_down',
            )
        if entry is not None:
            places.append(await self._local_place(entry, any(p.ready for p in places)))
        order = ordered(places)
        if order[0].local:
            return entry, []
        return entry, [p for p in order if not p.local]

    async def _local_place(self, entry: Any, need_no_fit: bool) -> Place:
        info = self.scheduler.describe(entry.id)
        ready, inflight = info.get('status') == 'ready', int(info.get('inflight') or 0)  # its own, not relayed ones
        if ready or need_no_fit:  # placement by fit only when nothing holds the model ready
            return Place(None, None, ready, inflight, 'unknown', 0)
        fit = await asyncio.to_thread(self.library.fit, entry)  # reads free memory (NVML may block)
        free = fit.vram_free_bytes if fit.vram_needed_bytes and fit.vram_free_bytes is not None else fit.ram_free_bytes
        return Place(None, None, False, inflight, fit.label, int(free or 0))

    @contextlib.contextmanager
    def _admitted(self, call: _Call) -> Iterator[None]:
        """Counted against the model's `concurrency_limit` while it is served; 429 beyond it."""
        model_id = call.model_id
        if not self.count_in(model_id):
            raise ProxyError(
                429,
                f'{model_id} has {self.config.settings.concurrency_limit} requests in flight (concurrency_limit); '
                'retry shortly',
                'rate_limit_error',
                'too_many_requests',
                headers={'Retry-After': '1'},
            )
        try:
            yield
        finally:
            self.count_out(model_id)

    def count_in(self, model_id: str) -> bool:
        """Count one more request served for the model, unless its `concurrency_limit` is reached (False)."""
        n = self._per_model.get(model_id, 0)
        if n >= self.config.settings.concurrency_limit:
            return False
        self._per_model[model_id] = n + 1
        return True

    def count_out(self, model_id: str) -> None:
        self._per_model[model_id] -= 1

    @contextlib.asynccontextmanager
    async def _watching(self, call: _Call) -> AsyncIterator[None]:
        """Served in this task; a client disconnect (seen on receive()) or an operator's cancel cancels it, and
        leaving the block then raises `_Cancelled`. Watching starts 2 ms in: most requests are answered by then,
        and it saves them a task."""
        me = asyncio.current_task()
        assert me is not None
        rec, reply = call.rec, call.reply
        rec.task = me
        serving = True
        watch: asyncio.Task[None] | None = None

        def gone(done: asyncio.Future[None]) -> None:
            # uvicorn also wakes receive() once the response is complete: that is no disconnect to act on.
            if serving and not reply.ended and not done.cancelled():
                rec.cancelled_by = rec.cancelled_by or 'client'
                me.cancel()

        def start_watch() -> None:
            nonlocal watch
            watch = asyncio.create_task(wait_disconnect(call.receive))
            watch.add_done_callback(gone)

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start_watch)
        try:
            yield
        except asyncio.CancelledError:
            if rec.cancelled_by is None:
                raise  # the server itself is shutting down
            me.uncancel()
            by = rec.cancelled_by
            raise _Cancelled(by, 'client disconnected' if by == 'client' else f'cancelled ({by})') from None
        finally:
            serving = False
            rec.task = None  # an operator's cancel from now on would hit the error reply, not the work
            timer.cancel()
            if watch is not None:
                watch.cancel()

    async def _lease_and_relay(self, call: _Call) -> None:
        """Relay on the model's server; once more on its successor if the server turns out to have died just before
        (its port refused us and nothing reached the client yet): the supervisor restarts it within a second or
        two, and a request that came in that moment should not be the one that fails."""
        if call.remotes:
            if await self._relay_remote(call):
                return
            call.remotes = None
            entry = call.fallback  # every remote that held it failed before answering: this app has it too
            assert call.data is not None
            call.rec.upstream = None
            call.model_id = entry.id
            call.body, call.assemble = self._upstream_body(call.body, call.data, call.spec, entry.id, call.stream)
        for attempt in (1, 2):
            async with self._leased(call) as up:
                try:
                    await self._relay(call, up)
                    return
                except _ServerDied as died:
                    if attempt == 2 or not await self.scheduler.server_gone(call.model_id, up.pid):
                        raise died.error from died
                    log.info('%s: its llama-server (pid %d) had died; trying its successor', call.model_id, up.pid)

    async def _relay_remote(self, call: _Call) -> bool:
        """Relay on the first remote that answers, in placement order. One found unreachable is marked down and
        the next is tried; False when none answered and the model is also here; a 503 when it is not."""
        assert self.remotes is not None and call.remotes is not None
        failed: list[ProxyError | _RemoteAnswer] = []
        for place in call.remotes:
            remote, model = place.remote, place.model
            assert remote is not None and model is not None
            if not remote.up:
                continue
            call.rec.upstream = remote.name
            body = self._remote_body(call, model.own_id)
            remote.busy[model.own_id] = remote.busy.get(model.own_id, 0) + 1
            try:
                await self._relay(call, remote.upstream, remote.target(call.target), body, who=f'remote {remote.name}')
                return True
            except _ServerDied as died:
                self.remotes.mark_down(remote, died.error.message)
                failed.append(died.error)
            except _TryElsewhere as refused:  # it answered, but cannot serve it now; nothing reached the client
                if refused.error.code == 'remote_auth':
                    self.remotes.mark_down(remote, refused.error.message)
                failed.append(_RemoteAnswer(refused.error))
            finally:
                remote.busy[model.own_id] -= 1
        if call.fallback is not None:
            return False
        if failed and isinstance(failed[-1], _RemoteAnswer):  # it answered: its own status and reason
            raise failed[-1].error
        raise unavailable(
            '; '.join(e.message for e in failed) or f'no remote holding {call.model_id!r} is reachable', 'remote_down'
        )

    def _remote_body(self, call: _Call, own_id: str) -> bytes:
        """What a remote is sent: the request params in force for the model as listed here (defaults, forced and
        stripped fields, the max_tokens cap) applied, and the remote's own name for it."""
        data = call.data
        assert data is not None
        if call.spec.generates:
            params = request_params.for_model(self.config.settings, call.model_id)
            data = request_params.apply(data, params, call.spec.max_tokens_field)
        if data is call.data and own_id == call.model_id:
            return call.body  # the client's bytes, as they came
        return _dumps({**data, 'model': own_id})

    @contextlib.asynccontextmanager
    async def _leased(self, call: _Call) -> AsyncIterator[Upstream]:
        """The model's llama-server, started if need be (a streaming chat client may watch it load); the
        scheduler's refusals become the client's errors."""
        loading = None
        if call.stream and call.spec.assemble == 'chat' and self.config.settings.send_loading_state and not call.face:
            loading = _LoadingState(call.reply, call.model_id)
        try:
            async with self.scheduler.lease(call.model_id, on_progress=loading and loading.on_progress) as up:
                if loading is not None:
                    await loading.close()
                if call.face is not None:
                    call.face.leased(up)
                yield up
        except ModelNotFound as e:
            raise not_found(e.message) from e
        except ModelUnusable as e:
            raise ProxyError(e.status, e.message, 'invalid_request_error', 'model_unusable') from e
        except (StartFailed, NoCapacity) as e:
            raise unavailable(e.message) from e
        finally:
            if loading is not None:
                await loading.close()

    async def _relay(
        self,
        call: _Call,
        up: Upstream,
        target: str | None = None,
        body: bytes | None = None,
        who: str = 'llama-server',
    ) -> None:
        """Send the request (on a kept-alive connection where one is free) and pass the answer on as it arrives,
        or assemble it. On a disconnect the connection is reset, which is how llama-server learns to stop.
        `target`, `body`: a remote's own path and body, if not the call's."""
        assembly = _Assembly(call.spec.assemble or '', call.rec) if call.assemble else None
        if up.pid:
            self.slot_time.serving(call.model_id, up.pid)
        body = call.body if body is None else body
        sent = time.perf_counter()
        try:
            if up.response_timeout is None:  # a local llama-server: prompt processing may take as long as it takes
                resp = await self._request(call, up, target or call.target, body, assembly)
            else:
                async with asyncio.timeout(up.response_timeout):
                    resp = await self._request(call, up, target or call.target, body, assembly)
        except TimeoutError:
            raise ProxyError(
                504, f'{call.model_id}: {who} did not start answering within {up.response_timeout:g} s', 'timeout'
            ) from None
        except UpstreamError as e:
            if isinstance(e, Unreachable) and not call.reply.started:
                raise _ServerDied(gateway_error(call.model_id, e, who)) from e
            raise gateway_error(call.model_id, e, who) from e
        complete = False
        try:
            call.rec.status = resp.status
            if not up.pid and resp.status in _ELSEWHERE and not call.reply.started:
                raise _TryElsewhere(_remote_refusal(who, resp.status, await resp.read()))
            if call.reply.started and resp.status >= 400:  # loading progress already opened a 200 stream
                raise _upstream_error(resp.status, await resp.read())
            if assembly is not None and resp.sink is not None:  # the stream was read whole, as it came
                await _reply_assembled(call, assembly)
            else:
                await self._pass_on(call, resp, sent - call.rec.t0)
            complete = True
        except Lost as e:
            raise gateway_error(call.model_id, e, who) from e
        finally:
            if complete:
                resp.release()
            else:
                resp.abort()

    def _request(
        self, call: _Call, up: Upstream, target: str, body: bytes, assembly: _Assembly | None
    ) -> Awaitable[Response]:
        return self._client().request(
            call.scope['method'],
            up.host,
            up.port,
            target,
            request_headers(call.scope, body, up.headers),
            body,
            sse_sink=assembly.feed if assembly is not None else None,
            max_idle=up.slots,
            tls=up.tls,
            connect_timeout=up.connect_timeout,
        )

    async def _pass_on(self, call: _Call, resp: Response, sent_s: float) -> None:
        reply = call.reply
        is_sse = resp.content_type.startswith(b'text/event-stream')
        if not reply.started:
            await reply.start(
                resp.status, stream_headers(resp.headers) if is_sse else relayed_headers(resp.headers), sse=is_sse
            )
        tally = Tally(call.rec, is_sse)
        while chunk := await resp.chunk():
            tally.took(chunk)
            if resp.drained:  # the last piece: it ends the reply too, one send fewer
                break
            await reply.body(chunk)
        # `chunk`: the last piece, or b'' when the stream ended after it was sent. Token counts are read once the
        # client has its answer: not on its clock.
        try:
            await reply.body(chunk, more=False)
        finally:
            tally.end(resp.status, sent_s)

    def _resolve(self, name: Any, also: Callable[[str], list[str]] | None = None) -> Any:
        if name is None or name == '':
            # A llama-server client may not name the model: fine while there is only one to choose.
            running = self.scheduler.running()
            if len(running) == 1:
                return self.library.get(running[0].model_id)
            models = [e for e in self.library.models() if not e.error]
            if len(models) == 1:
                return models[0]
            raise bad_request(f'the request names no "model"; available: {self._ids()}', 'missing_model')
        if not isinstance(name, str):
            raise bad_request('"model" must be a string', 'invalid_model')
        entry = None
        for candidate in also(name) if also is not None else [name]:
            entry = self.library.get(candidate)
            if entry is not None:
                break
        if entry is None:
            raise self._unknown_model(name)
        if entry.error:
            raise _unusable(entry.id, entry.error)
        return entry

    def _ids(self) -> str:
        ids = [e.id for e in self.library.models() if not e.error]
        more = f' (+{len(ids) - MAX_LISTED_IDS} more)' if len(ids) > MAX_LISTED_IDS else ''
        return (', '.join(ids[:MAX_LISTED_IDS]) or '(none found: check models_dirs)') + more

    def _unknown_model(self, name: str) -> ProxyError:
        return not_found(f'model {name!r} not found; available: {self._ids()}')

    def _upstream_body(
        self, body: bytes, data: dict[str, Any], spec: RouteSpec, model_id: str, stream: bool
    ) -> tuple[bytes, bool]:
        """What llama-server is sent (the client's bytes where nothing changes), and whether the answer is to be
        assembled from a stream: a non-streaming generation that may hold its slot longer than a moment."""
        if spec.generates:
            params = request_params.for_model(self.config.settings, model_id)
            applied = request_params.apply(data, params, spec.max_tokens_field)
            if applied is not data:  # defaults, forced or stripped fields: llama-server gets what is in force
                data, body = applied, _dumps(applied)
        assemble = False
        if spec.assemble is not None:
            assemble = not stream and not self.slot_time.quick_request(model_id, data, len(body))
            if assemble or (stream and 'return_progress' not in data):
                data = {**data, 'return_progress': data.get('return_progress', True)}
                if assemble:
                    data['stream'] = True
                    if spec.assemble in ('chat', 'text'):
                        data['stream_options'] = {'include_usage': True}
                body = _dumps(data)
        return body, assemble


@dataclass(slots=True)
class _Call:
    """One request, parsed and routed once: what leasing, relaying and recording read."""

    scope: Scope
    receive: Receive
    reply: Reply
    rec: RequestRecord
    spec: RouteSpec
    model_id: str
    target: str  # the path and query llama-server is asked for
    body: bytes  # as llama-server gets it
    stream: bool  # the client asked for a stream
    assemble: bool  # llama-server was asked for a stream the client did not ask for: the reply is built from it
    face: Face | None = None  # another API's shape (see `Proxy.serve_face`)
    remotes: list[Place] | None = None  # other machines to try first, in order (core/remotes)
    data: dict[str, Any] | None = None  # the parsed body, for a remote's own model name (with `remotes`)
    fallback: Any = None  # this app's own entry for the model, used when none of `remotes` answers


class Face(Protocol):
    """One request in another API's shape (core/ollama): names its model, translates its body, and replies."""

    @property
    def reply(self) -> Reply: ...

    @property
    def client_stream(self) -> bool: ...

    def model_name(self, data: dict[str, Any]) -> Any: ...

    def name_candidates(self, name: str) -> list[str]: ...

    def translate(self, data: dict[str, Any], entry: Any) -> tuple[str, dict[str, Any]]: ...

    def leased(self, up: Upstream) -> None: ...

    def finished(self, rec: RequestRecord) -> None: ...


class _Cancelled(Exception):
    def __init__(self, by: str, reason: str) -> None:
        super().__init__(reason)
        self.by, self.reason = by, reason


async def _tell(reply: Reply, rec: RequestRecord, err: ProxyError, gone_is_recorded: bool = False) -> None:
    """Send the error the request ends with. A client already gone: recorded as such for a refusal
    (`gone_is_recorded`); a cancel or an internal error keeps its own record."""
    try:
        await reply.error(err)
    except ClientGone:
        if gone_is_recorded:
            rec.status, rec.error = CLIENT_CLOSED, 'client disconnected'


class Tally:
    """What relaying an answer piece by piece keeps for its record: the first token's time (an event stream's
    first event that is not prompt progress), the first piece's, the last pieces (for the token counts)."""

    __slots__ = ('first_s', 'is_sse', 'n', 'rec', 'tail', 'waiting_first')

    def __init__(self, rec: RequestRecord, is_sse: bool) -> None:
        self.rec, self.is_sse = rec, is_sse
        self.tail: deque[bytes] = deque(maxlen=TAIL_CHUNKS)
        self.n = 0
        self.first_s = 0.0
        self.waiting_first = is_sse

    def took(self, chunk: bytes) -> bytes:
        if chunk:
            if self.waiting_first and has_output(chunk):
                self.rec.mark_first_token()
                self.waiting_first = False
            if not self.n:
                self.first_s = time.perf_counter() - self.rec.t0
            self.tail.append(chunk)
            self.n += 1
        return chunk

    def end(self, status: int, sent_s: float) -> None:
        """The record's figures from what was relayed (`record_end`)."""
        whole = self.n <= TAIL_CHUNKS
        record_end(self.rec, status, b''.join(self.tail), whole, self.is_sse, sent_s, self.first_s)


def stream_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An event stream's headers as the client gets them: `relayed_headers`, with ours for caching and buffering."""
    return [h for h in relayed_headers(headers) if h[0] not in _SSE_HEADER_NAMES] + SSE_HEADERS


def record_end(
    rec: RequestRecord, status: int, tail: bytes, whole: bool, is_sse: bool, sent_s: float, first_s: float
) -> None:
    """Token counts and speeds from the answer's last bytes (`whole`: `tail` is all of it). A JSON reply comes
    whole once generation ended: its first token is dated back by llama-server's own generation time (so a wait
    for a slot counts, as it would in a stream); a reply that generated nothing by its first bytes."""
    timings: dict[str, Any] = {}
    if is_sse:
        _record_usage(rec, usage_payloads(tail))
    elif whole and status < 400:
        objs = json_usage(tail)
        _record_usage(rec, objs)
        timings = next((o['timings'] for o in objs if isinstance(o.get('timings'), dict)), {})
    if not is_sse and rec.ttft_s is None and first_s and status < 400:  # an error has no first token
        generating_ms = timings.get('predicted_ms')
        if (timings.get('predicted_n') or 0) > 0 and isinstance(generating_ms, (int, float)):
            rec.ttft_s = round(max(sent_s, first_s - generating_ms / 1000), 4)
        else:
            rec.ttft_s = round(first_s, 4)
    if status >= 400:
        rec.error = _error_message(tail) if whole else f'upstream status {status}'


def _record_usage(rec: RequestRecord, objs: list[dict[str, Any]]) -> None:
    for key, value in usage_stats(objs).items():
        setattr(rec, key, value)


async def _reply_assembled(call: _Call, assembly: _Assembly) -> None:
    assembler = assembly.close()
    if assembler.error is not None:
        err = assembler.error['error']
        raise ProxyError(
            int(err.get('code') or 500) if str(err.get('code', '')).isdigit() else 500,
            str(err.get('message') or 'llama-server error'),
            str(err.get('type') or 'upstream_error'),
        )
    try:
        await call.reply.json(200, assembler.result())
    finally:
        _record_usage(call.rec, assembler.usage_objs)


class _Assembly:
    """A non-streaming reply built from llama-server's event stream, fed piece by piece as the stream arrives."""

    __slots__ = ('assembler', 'parser', 'rec')

    def __init__(self, kind: str, rec: RequestRecord) -> None:
        self.assembler = Assembler(kind)
        self.parser = SSEObjects()
        self.rec = rec

    def feed(self, data: bytes) -> None:  # called from the upstream connection's callback: must not block
        for obj in self.parser.feed(data):
            self.assembler.add(obj)
        if self.assembler.outputs and self.rec.ttft_s is None:
            self.rec.mark_first_token()

    def close(self) -> Assembler:
        for obj in self.parser.close():
            self.assembler.add(obj)
        return self.assembler


class _LoadingState:
    """While the model loads, stream its progress to a chat client as `reasoning_content` deltas."""

    def __init__(self, reply: Reply, model_id: str) -> None:
        self.reply = reply
        self.model_id = model_id
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._last = ''

    def on_progress(self, event: dict[str, Any]) -> None:
        state, progress = event.get('state'), event.get('progress')
        text = f'Loading {self.model_id}: {state}'
        if isinstance(progress, (int, float)):
            text += f' {int(progress * 100)}%'
        if text == self._last:
            return
        self._last = text
        self._queue.put_nowait(text + '\n')
        if self._task is None:
            self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        if not self.reply.started:
            await self.reply.start(200, [(b'content-type', b'text/event-stream'), *SSE_HEADERS], sse=True)
        while (text := await self._queue.get()) is not None:
            chunk = {
                'id': f'loading-{self.model_id}',
                'object': 'chat.completion.chunk',
                'created': int(time.time()),
                'model': self.model_id,
                'choices': [{'index': 0, 'delta': {'role': 'assistant', 'reasoning_content': text}}],
            }
            await self.reply.body(b'data: ' + jsonio.dumps(chunk) + b'\n\n')

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._queue.put_nowait(None)
        try:
            await task
        except ClientGone:
            raise
        except Exception:
            log.debug('loading-state stream failed', exc_info=True)


def _unusable(model_id: str, error: str) -> ProxyError:
    return ProxyError(409, f'{model_id} cannot be loaded: {error}', 'invalid_request_error', 'model_unusable')


_ELSEWHERE = frozenset({401, 403, 502, 503})  # a remote's answers that another place holding the model may not give


@dataclass(frozen=True, slots=True)
class _RemoteAnswer:
    """A remote's own refusal (not its silence), kept to answer with if no other place serves the request."""

    error: ProxyError

    @property
    def message(self) -> str:
        return self.error.message


class _TryElsewhere(Exception):
    """A remote answered that it cannot serve this now (its key refused, its model failed or it is full)."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def _remote_refusal(who: str, status: int, body: bytes) -> ProxyError:
    if status in (401, 403):  # our key for the remote, not the client's
        return bad_gateway(f'{who} refused the api_key configured for it (HTTP {status})', 'remote_auth')
    return ProxyError(status, f'{who}: {_error_message(body)}', 'upstream_error', status)


class _ServerDied(Exception):
    """The server refused the connection before any answer: maybe dead; `error` is what the client gets if so."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def gateway_error(model_id: str, e: UpstreamError, who: str = 'llama-server') -> ProxyError:
    if isinstance(e, Lost):
        return bad_gateway(f'{model_id}: {who} connection lost mid-response ({e})')
    return bad_gateway(f'{model_id}: cannot reach {who}: {e}')


def _forwarded(scope: Scope) -> bool:
    """Sent by another node's proxy: served from local models only (no forwarding loop)."""
    return any(name == FORWARDED for name, _ in scope.get('headers') or ())


def _remote_card(remote: Remote, model: Any) -> dict[str, Any]:
    row = model.row or {}
    meta = row.get('meta') or {}
    status = model.status or ('ready' if remote.state == RemoteState.UP else str(remote.state))
    if remote.state == RemoteState.DOWN:
        status = 'down'
    return {
        'id': model.id,
        'object': 'model',
        'created': int(row.get('mtime') or 0),
        'owned_by': remote.name,
        'aliases': [],
        'status': status,
        'context_length': meta.get('context_length'),
        'size': row.get('size_bytes'),
        'capabilities': row.get('capabilities') or [],
        'remote': {'name': remote.name, 'kind': remote.params.kind, 'state': str(remote.state), 'id': model.own_id},
    }


def has_output(sse: bytes) -> bool:
    """Whether these SSE bytes hold an event other than llama-server's prompt-processing progress."""
    return sse.count(b'data:') > sse.count(b'"prompt_progress"')


def _dumps(data: dict[str, Any]) -> bytes:
    try:
        return jsonio.dumps(data)
    except jsonio.TooDeep as e:
        raise bad_request(str(e), 'invalid_json') from None


def _parse_json(body: bytes, object_only: bool = True) -> Any:
    try:
        data = jsonio.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f'request body is not valid JSON: {e}', 'invalid_json') from None
    if object_only and not isinstance(data, dict):
        raise bad_request('request body must be a JSON object', 'invalid_json')
    return data


def upstream_target(scope: Scope, path: str) -> str:
    """The path and query llama-server is asked for."""
    qs = scope.get('query_string') or b''
    return path + ('?' + qs.decode('latin-1') if qs else '')


def relayed_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """llama-server's response headers as the client gets them: less hop-by-hop ones and its CORS headers, which
    allow every origin (CORS is the app's: the cors_origins setting)."""
    return [h for h in headers if h[0] not in _DROP_RESPONSE and not h[0].startswith(b'access-control-')]


def request_headers(scope: Scope, body: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """The client's headers less ours and hop-by-hop ones, plus `extra` (the server's own key)."""
    out = [(name, value) for name, value in scope.get('headers') or () if name not in _DROP_REQUEST]
    if body and not any(name == b'content-type' for name, _ in out):
        out.append((b'content-type', b'application/json'))
    out += extra
    return out


def _error_message(body: bytes) -> str:
    try:
        err = jsonio.loads(body).get('error')
        if isinstance(err, dict) and err.get('message'):
            return str(err['message'])
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    return body[:300].decode('utf-8', 'replace')


def _upstream_error(status: int, body: bytes) -> ProxyError:
    return ProxyError(status, _error_message(body), 'upstream_error', status)
