"""Cancellation through the proxy, against a real llama-server: a client that goes away (mid-stream, or while its
prompt is still being processed) frees the slot long before the work would have ended; an upstream that dies
mid-stream ends the client's stream with an `error` event, never `[DONE]`; an operator can cancel an in-flight
request."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SLOW_MODEL, wait_for
from tests.proxy_helpers import Served, serve, slot_busy
from tests.supervisor_helpers import direct

SLOW = SLOW_MODEL  # tests.conftest.slow_models
# One slot, one thread, a long context and small batches: the long prompt takes ~5 s to process here (~10 s on a
# loaded CI box) and generation lasts seconds, and llama-server can act on a cancel after every 64-token batch.
# llama-server serves each connection on one of max(parallel + 2, cores - 1) HTTP threads for as long as it is kept
# alive: the proxy's, the health check's and the sampler's fill three, and the test's own probes would wait for one.
PARAMS = {
    SLOW: {
        'ctx_size': 16384,
        'parallel': 1,
        'threads': 1,
        'batch_size': 64,
        'ubatch_size': 64,
        'extra_args': ['--threads-http', '8'],
    }
}
# A cancelled request's slot is idle after the next token or prompt batch; an uncancelled one stays busy for
# seconds more (the prompt alone: ~5 s). How fast a cancel lands is a benchmark's question (bench/cancel_latency.py).
CANCELLED_WITHIN_S = 2.5
LONG_PROMPT = ' '.join(f'w{i}' for i in range(3000))  # ~9k tokens


@pytest.fixture
async def served(system_factory: Any, slow_models: Path) -> Any:
    system = await system_factory(models_dirs=[slow_models], scan_well_known_dirs=False, models=PARAMS)
    async with serve(system) as s:
        yield s


async def idle_within(s: Served, limit_s: float) -> float:
    """Seconds until the model's one slot serves a new one-token request; fails past `limit_s`. A generation that
    was not cancelled holds the slot for many seconds more, so only a cancelled one passes. (Not `/slots`: under
    load this build at times answered it with a stale snapshot that showed a generating slot idle.)"""
    up = s.upstream(SLOW)
    async with direct(up, timeout=limit_s) as probe:
        await probe.get('/health')  # connect first, so the measurement is the slot's, not the connection's
        t0 = time.perf_counter()
        try:
            r = await probe.post('/completion', json={'prompt': 'x', 'n_predict': 1})
        except httpx.TimeoutException:
            raise AssertionError(f'the slot was still busy after {limit_s} s: the generation went on') from None
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0


async def last_row(s: Served) -> dict[str, Any]:
    async def row() -> dict[str, Any] | None:
        async with s.client() as c:
            rows = (await c.get('/api/requests', params={'limit': 1})).json()['requests']
        return rows[0] if rows else None

    return await wait_for(row)


async def test_client_closing_mid_stream_frees_the_slot(served: Served) -> None:
    body = {'model': SLOW, 'prompt': 'hi', 'n_predict': 12000, 'ignore_eos': True, 'stream': True}
    async with served.client() as c, c.stream('POST', '/completion', json=body) as r:
        assert r.status_code == 200
        tokens = 0
        async for line in r.aiter_lines():
            tokens += line.startswith('data: ') and '"prompt_progress"' not in line
            if tokens >= 5:
                break  # tokens are streaming: the slot is generating
    # Leaving the block closes the connection mid-stream.
    await idle_within(served, CANCELLED_WITHIN_S)
    row = await last_row(served)
    assert row['status'] == 499 and row['error'] == 'client disconnected' and row['ttft_s'] is not None


async def test_client_closing_during_prompt_processing_frees_the_slot(served: Served) -> None:
    # A non-streaming client with a long prompt: the proxy streams from llama-server, so the disconnect reaches it
    # at the next prompt batch (a plain request's closed connection goes unseen while the sampler scrapes).
    async with served.client() as c:
        call = asyncio.create_task(
            c.post('/v1/completions', json={'model': SLOW, 'prompt': LONG_PROMPT, 'max_tokens': 4})
        )
        await wait_for(lambda: served.system.scheduler.describe(SLOW)['status'] == 'ready', 30)
        await wait_for(lambda: slot_busy(served.upstream(SLOW)), 10, interval=0.005)
        await asyncio.sleep(0.3)  # well inside prompt processing, which takes seconds
        assert await slot_busy(served.upstream(SLOW))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await idle_within(served, CANCELLED_WITHIN_S)
    row = await last_row(served)
    assert row['status'] == 499 and row['ttft_s'] is None  # no token was produced


async def test_upstream_dying_mid_stream_ends_with_error_event(served: Served) -> None:
    body = {
        'model': SLOW,
        'messages': [{'role': 'user', 'content': 'hi'}],
        'max_tokens': 12000,
        'stream': True,
        'ignore_eos': True,
    }
    lines: list[str] = []
    async with served.client() as c, c.stream('POST', '/v1/chat/completions', json=body) as r:
        assert r.status_code == 200
        killed = False
        async for line in r.aiter_lines():
            lines.append(line)
            if not killed and '"content":"' in line:
                pid = next(u.pid for u in served.system.scheduler.running() if u.model_id == SLOW)
                os.kill(pid, signal.SIGKILL)
                killed = True
    events = [ln for ln in lines if ln]
    assert events[-2] == 'event: error' and events[-1].startswith('data: {"error"')
    assert 'data: [DONE]' not in lines
    row = await last_row(served)
    assert row['status'] == 502 and 'connection lost' in row['error']


async def test_operator_cancels_an_inflight_request(served: Served) -> None:
    body = {'model': SLOW, 'prompt': 'hi', 'n_predict': 12000, 'ignore_eos': True, 'stream': True}
    async with served.client() as c, served.client() as admin, c.stream('POST', '/completion', json=body) as r:
        assert r.status_code == 200
        inflight = (await admin.get('/api/requests/inflight')).json()['requests']
        assert [(q['model'], q['route']) for q in inflight] == [(SLOW, '/completion')]
        resp = await admin.post(f'/api/requests/{inflight[0]["id"]}/cancel')
        assert resp.status_code == 200
        lines = [line async for line in r.aiter_lines() if line]
        assert lines[-2] == 'event: error' and '"cancelled"' in lines[-1]
        await idle_within(served, CANCELLED_WITHIN_S)
        assert (await admin.post(f'/api/requests/{inflight[0]["id"]}/cancel')).status_code == 404
    row = await last_row(served)
    assert row['status'] == 499 and 'cancelled' in row['error']
