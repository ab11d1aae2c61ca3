"""`GET /api/events`: snapshot first, then deltas within a second, heartbeats, slow clients dropped, no leaks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.metrics_helpers import serve


async def _events(resp: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event name, parsed data) per SSE message; heartbeats come through as ('heartbeat', comment)."""
    buf = ''
    async for chunk in resp.aiter_text():
        buf += chunk
        while '\n\n' in buf:
            block, buf = buf.split('\n\n', 1)
            name, data = 'message', None
            for line in block.split('\n'):
                if line.startswith(':'):
                    name, data = 'heartbeat', line[1:].strip()
                elif line.startswith('event: '):
                    name = line[7:]
                elif line.startswith('data: '):
                    data = json.loads(line[6:])
            if data is not None:
                yield name, data


async def test_snapshot_then_model_state_and_log_line_within_a_second(system_factory) -> None:
    system = await system_factory(metrics_interval=60)
    await system.metrics.sample_once()
    system.logs.add('app', 'before the stream')
    async with serve(system) as served, httpx.AsyncClient(timeout=10) as client:
        url = f'{served.base_url}/api/events?topics=models,logs,metrics'
        async with client.stream('GET', url) as resp:
            assert resp.status_code == 200 and resp.headers['content-type'].startswith('text/event-stream')
            events = _events(resp)
            name, snap = await anext(events)
            assert name == 'snapshot' and snap['topics'] == ['models', 'logs', 'metrics']
            assert snap['metrics']['system']['ram_total_bytes'] > 0
            assert any(r['message'] == 'before the stream' for r in snap['logs'])

            t0 = time.monotonic()
            # The event the supervisor publishes when a model changes state.
            system.bus.publish('models', 'state', {'model': 'tiny-llama', 'state': 'starting', 'pid': None})
            system.logs.add_llama_line('tiny-llama', 'E failed to load model')
            got: dict[str, Any] = {}
            async for name, data in events:
                if name == 'logs' and data['data']['source'] != 'llama-server':
                    continue  # the app's own logging (httpx's request line) shares the topic
                got[name] = data
                if {'models', 'logs'} <= set(got):
                    break
            assert time.monotonic() - t0 < 1.0
            assert got['models']['type'] == 'state' and got['models']['data']['state'] == 'starting'
            assert got['logs']['data']['message'] == 'E failed to load model'
            assert got['logs']['data']['level'] == 'error' and got['logs']['data']['model'] == 'tiny-llama'
            assert got['logs']['seq'] > got['models']['seq']


async def test_heartbeat_when_quiet(system_factory) -> None:
    system = await system_factory(metrics_interval=60, sse_heartbeat=0.2)
    async with serve(system) as served, httpx.AsyncClient(timeout=10) as client:
        async with client.stream('GET', f'{served.base_url}/api/events?topics=alerts') as resp:
            events = _events(resp)
            assert (await anext(events))[0] == 'snapshot'
            assert (await anext(events))[0] == 'heartbeat'


async def test_bad_topics_and_method(system_factory) -> None:
    system = await system_factory(metrics_interval=60)
    baseline = system.bus.subscriber_count  # the services' own (metrics, the scheduler's library watch)
    async with serve(system) as served, httpx.AsyncClient(base_url=served.base_url) as client:
        r = await client.get('/api/events', params={'topics': 'metrics,nope'})
        assert r.status_code == 400 and 'nope' in r.json()['error']
        assert (await client.post('/api/events')).status_code == 405
    assert system.bus.subscriber_count == baseline  # neither left a subscriber behind


@pytest.mark.parametrize('queue_size', [10, 100_000], ids=['queue-overflows', 'write-blocks'])
async def test_slow_client_is_dropped(system_factory, queue_size: int) -> None:
    system = await system_factory(metrics_interval=60, sse_queue_size=queue_size)
    baseline = system.bus.subscriber_count
    async with serve(system) as served:
        port = int(served.base_url.rsplit(':', 1)[1])
        stream = system.frontdoor.handler_for('/api/events').__self__  # the EventStream
        stream.send_timeout = 0.5  # with a huge queue, the blocked socket write is what gives the client away
        # A client that asks for the stream and then never reads a byte.
        _reader, writer = await asyncio.open_connection('127.0.0.1', port)
        writer.write(b'GET /api/events?topics=logs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
        await writer.drain()
        await wait_for(lambda: stream.active == 1)
        line = 'x' * 4000
        t_end = time.monotonic() + 20
        while stream.active and time.monotonic() < t_end:
            for _ in range(50):
                system.logs.add('app', line)
            await asyncio.sleep(0.01)
        assert stream.active == 0, 'slow client was never dropped'
        await wait_for(lambda: system.bus.subscriber_count == baseline)
        writer.close()
        # A client that does read keeps working afterwards.
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream('GET', f'{served.base_url}/api/events?topics=logs') as resp:
                assert (await anext(_events(resp)))[0] == 'snapshot'


async def test_overflowing_reader_gets_dropped_notice(system_factory) -> None:
    system = await system_factory(metrics_interval=60, sse_queue_size=10)
    async with serve(system) as served, httpx.AsyncClient(timeout=10) as client:
        async with client.stream('GET', f'{served.base_url}/api/events?topics=logs') as resp:
            events = _events(resp)
            assert (await anext(events))[0] == 'snapshot'
            for i in range(50):  # a burst larger than the queue, published while the handler cannot run
                system.logs.add('app', f'burst {i}')
            names = [name async for name, _ in events]
    assert names[-1] == 'dropped' and names.count('logs') <= 10


async def test_no_subscriber_leak_after_1000_connects(system_factory) -> None:
    system = await system_factory(metrics_interval=60)
    baseline = system.bus.subscriber_count
    async with serve(system) as served, httpx.AsyncClient(timeout=10) as client:
        url = f'{served.base_url}/api/events?topics=metrics,models,logs,requests'
        for i in range(1000):
            async with client.stream('GET', url) as resp:
                assert resp.status_code == 200
                if i % 100 == 0:  # some read the snapshot, most hang up at once
                    assert (await anext(_events(resp)))[0] == 'snapshot'
        stream = system.frontdoor.handler_for('/api/events').__self__
        await wait_for(lambda: stream.active == 0 and system.bus.subscriber_count == baseline, deadline_s=20)


def test_real_app_serves_events_metrics_and_monitoring(app_process) -> None:
    """Through the real CLI and NiceGUI: the stream runs on the front door, /metrics at the root."""
    with httpx.Client(base_url=app_process.base_url, timeout=10) as client:
        with client.stream('GET', '/api/events', params={'topics': 'metrics'}) as resp:
            assert resp.status_code == 200
            seen: list[str] = []
            for line in resp.iter_lines():
                if line.startswith('event: '):
                    seen.append(line[7:])
                if seen.count('metrics') >= 1:  # the shared sampler's next tick arrives as a delta
                    break
            assert seen[0] == 'snapshot'
        r = client.get('/metrics')
        assert r.status_code == 200 and 'lap_memory_total_bytes' in r.text
        assert client.get('/api/monitoring').json()['system']['ram_total_bytes'] > 0
