"""The fast lane (core/proxy/fastlane.py), against a real llama-server: a plain request to a ready model is served
from the HTTP protocol and answered as the ASGI path would answer it; the perimeter holds; what the lane does not
take is answered the usual way; a client that leaves, an operator's cancel, a pooled connection closed under it and
pipelined requests are handled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.proxy import upstream
from core.proxy.upstream import Response, Unreachable, _Connection
from tests.conftest import SLOW_MODEL, wait_for
from tests.proxy_helpers import Served, serve, slot_busy
from tests.supervisor_helpers import direct
from tests.test_proxy_disconnect import CANCELLED_WITHIN_S, idle_within

A = 'tiny-llama'
ORIGIN = 'http://app.example'
KEY = 'lane-test-key-0123456789'
HELLO = [{'role': 'user', 'content': 'hello'}]
CHAT = {'model': A, 'messages': HELLO, 'max_tokens': 4, 'temperature': 0}
TINY = {A: {'embeddings': True, 'pooling': 'mean', 'parallel': 2}}


@pytest.fixture
async def served(system_factory: Any, models_dir: Path, tiny_model: Path) -> Any:
    system = await system_factory(
        models_dirs=[models_dir], scan_well_known_dirs=False, models=TINY, cors_origins=[ORIGIN]
    )
    async with serve(system) as s:
        yield s


async def warm(s: Served, c: httpx.AsyncClient, model: str = A, headers: dict[str, str] | None = None) -> None:
    """Loaded, its speed known (the first plain chat is assembled from a stream, and under load a slow first
    measurement may take a few more to settle) and a kept-alive connection to its llama-server pooled: what the
    lane needs."""
    body = {**CHAT, 'model': model}
    pool = s.system.proxy._client()
    for _ in range(20):
        r = await c.post('/v1/chat/completions', json=body, headers=headers)
        assert r.status_code == 200, r.text
        up = s.upstream(model)
        if pool.idle_count(up.host, up.port) >= 1:
            return
    raise AssertionError(f'{model}: no kept-alive connection after 20 requests')


async def rows(c: httpx.AsyncClient, n: int) -> list[dict[str, Any]]:
    return (await c.get('/api/requests', params={'limit': n})).json()['requests']


async def test_plain_requests_take_the_lane_and_get_llama_servers_answer(served: Served) -> None:
    lane = served.system.fast_lane
    text_body = {'model': A, 'prompt': 'hello', 'max_tokens': 3, 'temperature': 0}
    async with served.client() as c:
        await warm(served, c)
        before = lane.taken
        chat = await c.post('/v1/chat/completions', json=CHAT, headers={'origin': ORIGIN})
        emb = await c.post('/v1/embeddings', json={'model': A, 'input': 'hello'})
        text = await c.post('/v1/completions', json=text_body)
        assert lane.taken == before + 3  # all three went the lane
        assert (await c.get('/api/health/runtime')).json()['fast_lane_requests'] == lane.taken  # an operator sees it
        recorded = await rows(c, 3)
        other = await c.get('/api/health')  # an answer the ASGI path wrote
    async with direct(served.upstream(A)) as own:
        own_chat = (await own.post('/v1/chat/completions', json={**CHAT, 'model': None})).json()
        own_emb = (await own.post('/v1/embeddings', json={'input': 'hello'})).json()
        own_text = (await own.post('/v1/completions', json={**text_body, 'model': None})).json()
    for r in (chat, emb, text):
        assert r.status_code == 200, r.text
        assert r.headers['content-type'].startswith('application/json')
        assert int(r.headers['content-length']) == len(r.content)
        assert ('server' in r.headers) == ('server' in other.headers) and 'date' in r.headers  # as uvicorn's
    assert chat.headers['access-control-allow-origin'] == ORIGIN  # the CORS guard's headers are added
    assert chat.json()['choices'][0]['message']['content'] == own_chat['choices'][0]['message']['content']
    assert chat.json()['usage']['completion_tokens'] == 4
    assert emb.json()['data'][0]['embedding'] == pytest.approx(own_emb['data'][0]['embedding'], abs=1e-5)
    assert text.json()['choices'][0]['text'] == own_text['choices'][0]['text']
    # Recorded as any request: model, status, token counts, time to the first token for the generations.
    by_route = {row['route']: row for row in recorded}
    assert set(by_route) == {'/v1/chat/completions', '/v1/embeddings', '/v1/completions'}
    assert all(row['model'] == A and row['status'] == 200 and not row['stream'] for row in recorded)
    assert by_route['/v1/chat/completions']['completion_tokens'] == 4
    assert by_route['/v1/completions']['completion_tokens'] == 3
    assert by_route['/v1/embeddings']['prompt_tokens'] > 0
    assert by_route['/v1/chat/completions']['ttft_s'] > 0
    assert served.system.scheduler.describe(A)['inflight'] == 0  # every lease given back


async def stream_lines(c: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> tuple[httpx.Response, list[str]]:
    async with c.stream('POST', '/v1/chat/completions', json=body, **kw) as r:
        return r, [line async for line in r.aiter_lines() if line.startswith('data: ')]


def tokens(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line != 'data: [DONE]':
            for choice in json.loads(line[6:]).get('choices') or []:
                out.append((choice.get('delta') or {}).get('content') or '')
    return ''.join(out)


async def test_a_stream_takes_the_lane_and_is_passed_on_as_it_comes(served: Served) -> None:
    lane = served.system.fast_lane
    body = {**CHAT, 'stream': True, 'stream_options': {'include_usage': True}}
    async with served.client() as c:
        await warm(served, c)
        before = lane.taken
        pool = served.system.proxy._client()
        fresh = []
        send_fresh = pool.send_fresh
        pool.send_fresh = lambda *args: fresh.append(args) or send_fresh(*args)  # type: ignore[method-assign]
        # The first on the pooled connection; llama-server closes a stream's, so the second on a new one.
        first, first_lines = await stream_lines(c, body, headers={'origin': ORIGIN})
        second, second_lines = await stream_lines(c, body)
        assert lane.taken == before + 2 and len(fresh) == 1
        recorded = await rows(c, 2)
    async with direct(served.upstream(A)) as own:
        async with own.stream('POST', '/v1/chat/completions', json={**body, 'model': None}) as r:
            own_lines = [line async for line in r.aiter_lines() if line.startswith('data: ')]
    for r, lines in ((first, first_lines), (second, second_lines)):
        assert r.status_code == 200
        assert r.headers['content-type'].startswith('text/event-stream')
        assert r.headers['transfer-encoding'] == 'chunked' and 'content-length' not in r.headers
        assert r.headers['cache-control'] == 'no-cache' and r.headers['x-accel-buffering'] == 'no'
        assert lines[-1] == 'data: [DONE]'
        assert tokens(lines) == tokens(own_lines) and tokens(lines)  # llama-server's tokens, all of them
    assert first.headers['access-control-allow-origin'] == ORIGIN
    for row in recorded:
        assert row['model'] == A and row['status'] == 200 and row['stream']
        assert row['completion_tokens'] == 4 and row['ttft_s'] > 0
    assert served.system.scheduler.describe(A)['inflight'] == 0


async def test_a_stream_whose_new_connection_is_turned_away_is_sent_the_usual_way(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama-server closes a new connection unanswered while all its HTTP threads are busy: the ASGI path has the
    # retries for that, so the lane hands such a stream to it, its record carried over.
    pool = served.system.proxy._client()
    body = {**CHAT, 'stream': True}
    async with served.client() as c:
        await warm(served, c)
        count = len(await rows(c, 50))

        async def turned_away(*args: Any) -> Any:
            raise Unreachable('upstream closed the connection before answering (EOF)')

        monkeypatch.setattr(pool, 'send_now', lambda *args: None)  # no idle connection: a new one is needed
        monkeypatch.setattr(pool, 'send_fresh', turned_away)
        taken = served.system.fast_lane.taken
        r, lines = await stream_lines(c, body)
        assert served.system.fast_lane.taken == taken + 1
        recorded = await rows(c, 50)
    assert r.status_code == 200 and lines[-1] == 'data: [DONE]' and tokens(lines)
    assert len(recorded) == count + 1 and recorded[0]['status'] == 200 and recorded[0]['stream']


async def test_a_stream_whose_new_connection_is_closed_unanswered_is_sent_the_usual_way(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same, the way llama-server does it: the connection is accepted, then closed before a byte of answer.
    pool = served.system.proxy._client()
    closed = 0

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        closed += 1
        writer.close()

    busy = await asyncio.start_server(close_at_once, '127.0.0.1', 0)
    busy_port = busy.sockets[0].getsockname()[1]
    send_fresh = pool.send_fresh
    async with served.client() as c:
        await warm(served, c)
        monkeypatch.setattr(pool, 'send_now', lambda *args: None)
        monkeypatch.setattr(pool, 'send_fresh', lambda host, port, *rest: send_fresh(host, busy_port, *rest))
        taken = served.system.fast_lane.taken
        r, lines = await stream_lines(c, {**CHAT, 'stream': True})
        assert served.system.fast_lane.taken == taken + 1 and closed == 1
    busy.close()
    assert r.status_code == 200 and lines[-1] == 'data: [DONE]' and tokens(lines)
    assert served.system.scheduler.describe(A)['inflight'] == 0


async def test_a_request_pipelined_behind_a_stream_is_answered_after_it(served: Served) -> None:
    async with served.client() as c:
        await warm(served, c)
    host, port = served.base_url.removeprefix('http://').split(':')
    raw = b''
    for body in ({**CHAT, 'stream': True}, {'model': A, 'input': 'hello'}):
        path = '/v1/chat/completions' if 'messages' in body else '/v1/embeddings'
        data = json.dumps(body).encode()
        head = f'POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n'
        raw += head.encode() + b'content-length: %d\r\n\r\n' % len(data) + data
    taken = served.system.fast_lane.taken
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)  # both in one write: the embedding waits for the stream
    await writer.drain()
    data = b''
    while True:  # the stream, then the embedding's answer (perhaps in the same read)
        data += await read_some(reader)
        stream, end, rest = data.partition(b'\r\n0\r\n\r\n')
        head, sep, tail = rest.partition(b'\r\n\r\n')
        if end and sep:
            length = int(next(h for h in head.split(b'\r\n') if h.lower().startswith(b'content-length:'))[15:])
            if len(tail) >= length:
                break
    writer.close()
    status, answer = head.split(b'\r\n')[0], json.loads(tail[:length])
    assert stream.startswith(b'HTTP/1.1 200 ') and b'data: [DONE]' in stream
    assert status.startswith(b'HTTP/1.1 200 ') and answer['data'][0]['embedding']
    assert served.system.fast_lane.taken >= taken + 1  # the stream, at least (the embedding may go either way)


async def test_a_stream_request_llama_server_refuses_is_answered_whole(served: Served) -> None:
    async with served.client() as c:
        await warm(served, c)
        taken = served.system.fast_lane.taken
        r = await c.post('/v1/chat/completions', json={**CHAT, 'stream': True, 'messages': 'not a list'})
        assert served.system.fast_lane.taken == taken + 1
    assert r.status_code == 400 and r.headers['content-type'].startswith('application/json')
    assert r.json()['error']['message']
    assert int(r.headers['content-length']) == len(r.content)


async def test_what_the_lane_does_not_take_is_answered_the_usual_way(served: Served) -> None:
    lane = served.system.fast_lane
    async with served.client() as c:
        await warm(served, c)
        before = lane.taken
        unknown = await c.post('/v1/chat/completions', json={**CHAT, 'model': 'no-such-model'})
        json_type = {'content-type': 'application/json'}
        broken = await c.post('/v1/chat/completions', content=b'{"model": ', headers=json_type)
        unbounded = await c.post('/v1/chat/completions', json={**CHAT, 'max_tokens': None})  # assembled
        assert lane.taken == before
    assert unknown.status_code == 404 and unknown.json()['error']['code'] == 'model_not_found'
    assert broken.status_code == 400 and broken.json()['error']['type'] == 'invalid_request_error'
    assert unbounded.status_code == 200 and unbounded.json()['object'] == 'chat.completion'


@pytest.fixture
async def keyed(system_factory: Any, models_dir: Path, tiny_model: Path) -> Any:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, models=TINY, api_keys=[KEY])
    async with serve(system) as s:
        yield s


async def test_the_lane_keeps_the_perimeter(keyed: Served) -> None:
    lane = keyed.system.fast_lane
    auth = {'authorization': f'Bearer {KEY}'}
    async with keyed.client() as c:
        await warm(keyed, c, headers=auth)
        before = lane.taken
        no_key = await c.post('/v1/chat/completions', json=CHAT)
        wrong = await c.post('/v1/chat/completions', json=CHAT, headers={'authorization': 'Bearer nope'})
        rebound = await c.post('/v1/chat/completions', json=CHAT, headers={**auth, 'host': 'evil.example'})
        assert lane.taken == before
        ok = await c.post('/v1/chat/completions', json=CHAT, headers=auth)
        assert lane.taken == before + 1
    assert no_key.status_code == 401 and wrong.status_code == 401
    assert no_key.json()['error']['type'] == 'authentication_error'
    assert rebound.status_code == 403
    assert ok.status_code == 200 and ok.json()['choices'][0]['message']['content']


async def test_a_pooled_connection_closed_under_the_lane_is_sent_again(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken: list[Any] = []
    send = _Connection.send

    def closed_first(conn: _Connection, head: bytes, body: bytes, head_only: bool) -> Any:
        if not broken:  # as if llama-server had closed it just now: the request never reaches it
            broken.append(conn)
            conn.transport.get_extra_info('socket').shutdown(socket.SHUT_RDWR)
        return send(conn, head, body, head_only)

    async with served.client() as c:
        await warm(served, c)
        count, taken = len(await rows(c, 50)), served.system.fast_lane.taken
        monkeypatch.setattr(_Connection, 'send', closed_first)
        r = await c.post('/v1/chat/completions', json=CHAT)
        assert r.status_code == 200, r.text
        assert r.json()['choices'][0]['message']['content']
        assert broken and served.system.fast_lane.taken == taken + 1  # the lane took it, on that connection
        recorded = await rows(c, 50)
    assert len(recorded) == count + 1  # one record for it, not one per path it took
    assert recorded[0]['status'] == 200 and recorded[0]['completion_tokens'] == 4


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    async with served.client() as c:
        await warm(served, c)
    host, port = served.base_url.removeprefix('http://').split(':')
    bodies = [httpx.Request('POST', 'http://x/v1/embeddings', json={'model': A, 'input': w}) for w in ('a', 'b b')]
    bodies.append(httpx.Request('POST', 'http://x/v1/chat/completions', json=CHAT))
    raw = b''
    for req in bodies:
        head = f'POST {req.url.raw_path.decode()} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n'
        raw += head.encode() + b'content-length: %d\r\n\r\n' % len(req.content) + req.content
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)  # all three in one write: the second and third wait for the first
    await writer.drain()
    answers = []
    for _ in bodies:
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) != b'\r\n':
            if line.lower().startswith(b'content-length:'):
                length = int(line.split(b':')[1])
        answers.append((status.split()[1], await reader.readexactly(length)))
    writer.close()
    assert [s for s, _ in answers] == [b'200'] * 3
    first, second, third = (httpx.Response(200, content=body).json() for _, body in answers)
    assert first['usage']['prompt_tokens'] < second['usage']['prompt_tokens']  # 'a' before 'b b'
    assert third['object'] == 'chat.completion'


# ---- a client that leaves, an operator's cancel: one slot, held by a long stream, so the lane's request waits --
SLOW = SLOW_MODEL
SLOW_PARAMS = {SLOW: {'parallel': 1, 'threads': 1, 'ctx_size': 4096, 'extra_args': ['--threads-http', '8']}}


@pytest.fixture
async def slow(system_factory: Any, slow_models: Path) -> Any:
    system = await system_factory(models_dirs=[slow_models], scan_well_known_dirs=False, models=SLOW_PARAMS)
    async with serve(system) as s:
        yield s


async def waiting_in_the_lane(s: Served, c: httpx.AsyncClient) -> tuple[asyncio.Task[httpx.Response], str]:
    """A short plain request taken by the lane while a long stream holds the one slot; returns it and its id."""
    await warm(s, c, SLOW)
    up = s.upstream(SLOW)
    hold = {'prompt': 'hi', 'n_predict': 100000, 'ignore_eos': True, 'stream': True}
    holder = direct(up, timeout=120)
    s.holder = holder  # type: ignore[attr-defined]
    stream = await holder.send(holder.build_request('POST', '/completion', json=hold), stream=True)
    s.hold_stream = stream  # type: ignore[attr-defined]
    await wait_for(lambda: slot_busy(up), 10, interval=0.01)
    taken = s.system.fast_lane.taken
    call = asyncio.create_task(c.post('/v1/chat/completions', json={**CHAT, 'model': SLOW}))
    await wait_for(lambda: s.system.fast_lane.taken == taken + 1, 10, interval=0.005)
    inflight = (await c.get('/api/requests/inflight')).json()['requests']
    assert [r['model'] for r in inflight] == [SLOW]
    return call, inflight[0]['id']


async def release_slot(s: Served) -> None:
    await s.hold_stream.aclose()  # type: ignore[attr-defined]
    await s.holder.aclose()  # type: ignore[attr-defined]


async def test_a_client_leaving_the_lane_is_recorded_and_its_lease_given_back(slow: Served) -> None:
    async with slow.client() as c:
        call, _ = await waiting_in_the_lane(slow, c)
        call.cancel()  # closes the client's connection
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_for(lambda: slow.system.scheduler.describe(SLOW)['inflight'] == 0, 10)
        await release_slot(slow)
        row = (await rows(c, 1))[0]
        assert row['status'] == 499 and row['error'] == 'client disconnected'
        after = await c.post('/v1/chat/completions', json={**CHAT, 'model': SLOW})  # the model serves on
        assert after.status_code == 200


async def test_an_operator_cancel_in_the_lane_answers_503(slow: Served) -> None:
    async with slow.client() as c:
        call, request_id = await waiting_in_the_lane(slow, c)
        r = await c.post(f'/api/requests/{request_id}/cancel')
        assert r.status_code == 200
        answer = await asyncio.wait_for(call, 10)
        await release_slot(slow)
        assert answer.status_code == 503 and answer.json()['error']['code'] == 'cancelled'
        row = (await rows(c, 1))[0]
        assert row['status'] == 499 and row['error'] == 'cancelled (operator)'
        assert slow.system.scheduler.describe(SLOW)['inflight'] == 0


async def test_a_refused_request_is_answered_at_its_headers_not_held(keyed: Served) -> None:
    # No key, a large body declared and not sent: refused at once, as the ASGI path refuses, its body never held.
    host, port = keyed.base_url.removeprefix('http://').split(':')
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f'POST /v1/embeddings HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n'
    writer.write(head.encode() + b'content-length: 1000000\r\n\r\n{"model": ')
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.split()[1] == b'401'
    assert keyed.system.fast_lane.taken == 0


@pytest.mark.parametrize('model', [A, 'no-such-model'])  # the lane's answer; the ASGI path's (a hand-back)
async def test_a_shutdown_lets_a_request_whose_body_is_arriving_finish(served: Served, model: str) -> None:
    # uvicorn answers a request whose body is still coming when a graceful shutdown begins, then closes; a body
    # held back for the lane is answered the same way, not cut off.
    async with served.client() as c:
        await warm(served, c)
    host, port = served.base_url.removeprefix('http://').split(':')
    body = json.dumps({'model': model, 'input': 'hello'}).encode()
    head = f'POST /v1/embeddings HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n'
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + b'content-length: %d\r\n\r\n' % len(body) + body[:10])
    await writer.drain()
    await wait_for(lambda: any(p._held for p in served.server.server_state.connections), 10, interval=0.005)
    taken = served.system.fast_lane.taken
    served.server.should_exit = True
    await wait_for(lambda: not any(s.is_serving() for s in served.server.servers), 10, interval=0.005)
    writer.write(body[10:])
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    headers = {}
    while (line := await reader.readline()) not in (b'\r\n', b''):
        name, _, value = line.decode().partition(':')
        headers[name.lower()] = value.strip()
    assert status.split()[1:2] == ([b'200'] if model == A else [b'404']), status  # (b'': closed unanswered)
    answer = json.loads(await reader.readexactly(int(headers['content-length'])))
    assert headers.get('connection') == 'close'
    if model == A:
        assert len(answer['data'][0]['embedding']) > 0
        assert served.system.fast_lane.taken == taken + 1
    else:
        assert answer['error']['code'] == 'model_not_found'
    assert await reader.read() == b''  # then closed
    writer.close()


# ---- streams in the lane: a client that leaves, an upstream that dies, an operator's cancel, a slow reader -----
LONG = {'model': SLOW, 'prompt': 'hi', 'max_tokens': 12000, 'ignore_eos': True, 'stream': True}


async def test_a_client_leaving_a_stream_in_the_lane_stops_llama_server(slow: Served) -> None:
    async with slow.client() as c:
        await warm(slow, c, SLOW)
        taken = slow.system.fast_lane.taken
        async with c.stream('POST', '/v1/completions', json=LONG) as r:
            assert r.status_code == 200 and slow.system.fast_lane.taken == taken + 1
            tokens = 0
            async for line in r.aiter_lines():
                tokens += line.startswith('data: ') and '"prompt_progress"' not in line
                if tokens >= 5:
                    break  # generating: leaving the block closes the connection mid-stream
        await idle_within(slow, CANCELLED_WITHIN_S)
        row = (await rows(c, 1))[0]
    assert row['status'] == 499 and row['error'] == 'client disconnected' and row['ttft_s'] is not None
    assert row['stream'] and slow.system.scheduler.describe(SLOW)['inflight'] == 0


async def test_an_upstream_dying_under_a_stream_in_the_lane_ends_it_with_an_error_event(slow: Served) -> None:
    async with slow.client() as c:
        await warm(slow, c, SLOW)
        taken = slow.system.fast_lane.taken
        lines: list[str] = []
        async with c.stream('POST', '/v1/completions', json=LONG) as r:
            assert slow.system.fast_lane.taken == taken + 1
            killed = False
            async for line in r.aiter_lines():
                lines.append(line)
                if not killed and '"text":"' in line:
                    os.kill(slow.upstream(SLOW).pid, signal.SIGKILL)
                    killed = True
        row = (await rows(c, 1))[0]
    events = [line for line in lines if line]
    assert events[-2] == 'event: error' and events[-1].startswith('data: {"error"')
    assert 'data: [DONE]' not in lines
    assert row['status'] == 502 and 'connection lost' in row['error']
    assert slow.system.scheduler.describe(SLOW)['inflight'] == 0


async def test_an_operator_cancel_of_a_stream_in_the_lane_ends_it_with_an_error_event(slow: Served) -> None:
    async with slow.client() as c, slow.client() as admin:
        await warm(slow, c, SLOW)
        taken = slow.system.fast_lane.taken
        async with c.stream('POST', '/v1/completions', json=LONG) as r:
            assert slow.system.fast_lane.taken == taken + 1
            inflight = (await admin.get('/api/requests/inflight')).json()['requests']
            assert (await admin.post(f'/api/requests/{inflight[0]["id"]}/cancel')).status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
        assert lines[-2] == 'event: error' and '"cancelled"' in lines[-1]
        await idle_within(slow, CANCELLED_WITHIN_S)
        row = (await rows(c, 1))[0]
    assert row['status'] == 499 and 'cancelled' in row['error']
    assert slow.system.scheduler.describe(SLOW)['inflight'] == 0


async def slow_reader(s: Served, body: dict[str, Any]) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with small socket buffers (the app's side of its connection too, a slow network: a few hundred
    events fill them) that has sent a stream request and reads nothing yet; with the app's protocol for it."""
    host, port = s.base_url.removeprefix('http://').split(':')
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    here = sock.getsockname()
    proto = await wait_for(lambda: next((p for p in s.server.server_state.connections if p.client == here), None), 10)
    proto.transport.get_extra_info('socket').setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    proto.transport.set_write_buffer_limits(high=8192)
    raw = json.dumps(body).encode()
    head = f'POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n'
    writer.write(head.encode() + b'content-length: %d\r\n\r\n' % len(raw) + raw)
    await writer.drain()
    return proto, reader, writer


async def read_some(reader: asyncio.StreamReader) -> bytes:
    data = await asyncio.wait_for(reader.read(65536), 10)
    if not data:
        raise AssertionError('the app closed the connection')
    return data


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    data = b''
    while not data.endswith(b'0\r\n\r\n'):
        data += await read_some(reader)
    return data


def dechunk(data: bytes) -> bytes:
    """The body of one chunked response (head included in `data`)."""
    rest = data.partition(b'\r\n\r\n')[2]
    out = []
    while rest:
        size, _, rest = rest.partition(b'\r\n')
        n = int(size, 16)
        if not n:
            break
        out.append(rest[:n])
        rest = rest[n + 2 :]
    return b''.join(out)


def waiting(proto: Any) -> Response | None:
    """The lane's upstream response on this connection while the client is not reading and events wait for it."""
    lane = proto._lane
    resp = lane.resp if lane is not None else None
    return resp if proto.flow.write_paused and resp is not None and resp.unread else None


async def test_a_client_slow_to_read_a_stream_gets_all_of_it(served: Served) -> None:
    # Once its connection's buffers are full the lane stops passing events on; here llama-server sends them all
    # meanwhile, so nothing but the client's reading again wakes the lane. (On a busy machine one read from
    # llama-server may bring the rest of the stream while the client's buffers still had room: the lane has then
    # written it all, the transport holds it, and the client must still get every event.)
    async with served.client() as c:
        await warm(served, c)
    n = 900
    taken = served.system.fast_lane.taken
    proto, reader, writer = await slow_reader(
        served, {'model': A, 'prompt': 'hi', 'max_tokens': n, 'stream': True, 'ignore_eos': True}
    )
    await wait_for(lambda: served.system.fast_lane.taken == taken + 1, 30, interval=0.01)
    lane = proto._lane
    await wait_for(lambda: proto._lane is None or (lane.resp is not None and lane.resp.complete), 120, interval=0.01)
    assert proto.flow.write_paused  # the client read nothing: its buffers are full
    data = await read_chunked(reader)
    writer.close()
    events = [line for line in dechunk(data).split(b'\n') if line.startswith(b'data: ')]
    assert events[-1] == b'data: [DONE]'
    assert sum(b'"text":"' in e for e in events) >= n - 1  # every token (the last event may carry none)
    async with served.client() as c:
        row = (await rows(c, 1))[0]
    assert row['status'] == 200 and row['completion_tokens'] == n


async def test_a_stream_the_client_does_not_read_pauses_llama_server(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past HIGH_WATER unread bytes the upstream socket is paused (llama-server then waits); reading resumes it.
    monkeypatch.setattr(upstream, 'HIGH_WATER', 16384)
    async with served.client() as c:
        await warm(served, c)
    n = 900
    proto, reader, writer = await slow_reader(
        served, {'model': A, 'prompt': 'hi', 'max_tokens': n, 'stream': True, 'ignore_eos': True}
    )
    resp = await wait_for(lambda: waiting(proto), 60, interval=0.01)
    await wait_for(lambda: resp._conn.paused, 60, interval=0.01)
    assert not resp.complete
    data = await read_chunked(reader)
    writer.close()
    events = [line for line in dechunk(data).split(b'\n') if line.startswith(b'data: ')]
    assert events[-1] == b'data: [DONE]' and sum(b'"text":"' in e for e in events) >= n - 1


async def test_events_waiting_for_a_slow_client_reach_it_before_the_error(slow: Served) -> None:
    # llama-server dies while the client is not reading: it still gets what came before, then the error event.
    async with slow.client() as c:
        await warm(slow, c, SLOW)
    proto, reader, writer = await slow_reader(slow, {**LONG, 'timings_per_token': True})  # (events all differ)
    resp = await wait_for(lambda: waiting(proto), 30, interval=0.01)
    pending = b''.join(resp._chunks)
    assert b'"predicted_n":' in pending.split(b'\n\n')[0]
    os.kill(slow.upstream(SLOW).pid, signal.SIGKILL)
    await wait_for(lambda: resp.error is not None, 10, interval=0.005)  # the lane has seen the loss
    data = dechunk(await read_chunked(reader))
    writer.close()
    assert pending and pending in data  # every event that had come, then the error
    events = [line for line in data.split(b'\n') if line]
    assert b'event: error' in events and b'data: [DONE]' not in events


@pytest.mark.parametrize('way', ['handed back by the lane', 'the ASGI way'])
async def test_a_stream_with_a_request_pipelined_behind_it_hears_its_client_leave(
    slow: Served, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    # uvicorn tells a disconnect only to the newest request on a connection: a stream answering ahead of a
    # pipelined one must still hear its client leave. Handed back: the lane's new connection is turned away after
    # the next request was read, so the stream goes the ASGI way while uvicorn already holds that next request.
    pool = slow.system.proxy._client()
    async with slow.client() as c:
        await warm(slow, c, SLOW)

    async def turned_away(*args: Any) -> Any:
        await asyncio.sleep(0.05)  # (the pipelined request is read meanwhile)
        raise Unreachable('upstream closed the connection before answering (EOF)')

    if way == 'handed back by the lane':
        monkeypatch.setattr(pool, 'send_now', lambda *args: None)
        monkeypatch.setattr(pool, 'send_fresh', turned_away)
        first = ('/v1/completions', LONG)
    else:  # llama-server's own route: never the lane's
        first = ('/completion', {'model': SLOW, 'prompt': 'hi', 'n_predict': 12000, 'ignore_eos': True, 'stream': True})
    host, port = slow.base_url.removeprefix('http://').split(':')
    raw = b''
    for path, body in (first, ('/v1/completions', {'model': SLOW, 'prompt': 'x', 'max_tokens': 1})):
        data = json.dumps(body).encode()
        head = f'POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n'
        raw += head.encode() + b'content-length: %d\r\n\r\n' % len(data) + data
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    got = b''
    while got.count(b'"content":"' if first[0] == '/completion' else b'"text":"') < 5:  # generating
        got += await read_some(reader)
    writer.close()
    monkeypatch.undo()
    await idle_within(slow, CANCELLED_WITHIN_S)
    async with slow.client() as c:
        row = next(r for r in await rows(c, 5) if r['stream'])
    assert row['status'] == 499 and row['error'] == 'client disconnected'
