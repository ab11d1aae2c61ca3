"""Which non-streaming generations go to llama-server as they came and which are streamed from it and assembled
(`core/proxy/slot_time.py`), against the real llama-server: the client gets the same answer either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.proxy.slot_time import MAX_QUICK_BODY_BYTES, QUICK_S, SlotTime
from tests.proxy_helpers import Served, serve
from tests.supervisor_helpers import direct

A = 'tiny-llama'
HELLO = [{'role': 'user', 'content': 'hello'}]


@pytest.fixture
async def served(system_factory: Any, models_dir: Path, tiny_model: Path) -> Any:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False)
    async with serve(system) as s:
        yield s


async def test_short_requests_go_as_they_came_on_a_kept_alive_connection(served: Served) -> None:
    body = {'model': A, 'messages': HELLO, 'max_tokens': 4, 'temperature': 0}
    answers = []
    async with served.client() as c:
        up = None
        for _ in range(3):
            r = await c.post('/v1/chat/completions', json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json())
            up = served.upstream(A)
            # The first is streamed (the model's speed is not known yet): llama-server closes a stream's connection.
            # The others go plain and reuse one connection.
            pool = served.system.proxy._client()
            assert pool.idle_count(up.host, up.port) == (0 if len(answers) == 1 else 1)
        assert up is not None
        async with direct(up) as own:
            plain = (await own.post('/v1/chat/completions', json={**body, 'model': None})).json()
        rows = (await c.get('/api/requests', params={'limit': 3})).json()['requests']
    for answer in answers:
        assert answer['object'] == 'chat.completion' and answer['model'] == A
        assert answer['choices'][0]['message']['content'] == plain['choices'][0]['message']['content']
        assert answer['choices'][0]['finish_reason'] == 'length' and answer['usage']['completion_tokens'] == 4
    # Both ways, the activity log has the counts and the time to the first token.
    assert [(row['completion_tokens'], row['ttft_s'] > 0) for row in rows] == [(4, True)] * 3


async def test_long_and_unbounded_requests_are_streamed_and_assembled(served: Served) -> None:
    async with served.client() as c:
        for body in (
            {'model': A, 'messages': HELLO, 'max_tokens': 4},  # teaches the proxy the model's speed
            # Over the size whose prompt speed can be guessed (here the bulk is not prompt: the context is small).
            {'model': A, 'messages': HELLO, 'max_tokens': 2, 'user': 'u' * MAX_QUICK_BODY_BYTES},
            {'model': A, 'prompt': 'hello', 'max_tokens': 3, 'n_probs': 2},
            {'model': A, 'prompt': 'hello', 'max_tokens': 10**6},
        ):
            route = '/v1/chat/completions' if 'messages' in body else '/v1/completions'
            if body['max_tokens'] == 10**6:  # would run to the end of the context: stopped by the test instead
                body = {**body, 'max_tokens': 3}
                estimate = served.system.proxy.slot_time.estimate_s(A, 40, 10**6)
                assert estimate is not None and estimate > QUICK_S
            r = await c.post(route, json=body)
            assert r.status_code == 200, r.text
            choice = r.json()['choices'][0]
            assert choice['finish_reason'] == 'length'
            assert r.json()['usage']['completion_tokens'] == body['max_tokens']
    assert not served.system.proxy.slot_time.quick(A, 10 * MAX_QUICK_BODY_BYTES, 2)


def test_slot_time_is_quick_only_when_it_knows_and_the_job_is_short() -> None:
    t = SlotTime()
    assert not t.quick('m', 100, 8)  # no speed measured yet
    t.observe('m', prompt_tps=2000.0, gen_tps=100.0)
    assert t.quick('m', 300, 8)  # ~100 prompt tokens and 8 generated: ~0.13 s
    assert not t.quick('m', 300, 100)  # 1 s of generation
    assert not t.quick('m', 300, None) and not t.quick('m', 300, -1)  # no limit: to the end of the context
    assert not t.quick('m', MAX_QUICK_BODY_BYTES + 1, 1)  # prompt speed falls with length: never guessed
    for _ in range(10):
        t.observe('m', prompt_tps=2000.0, gen_tps=5.0)  # the model got slow (a swap to CPU, a long context)
    assert not t.quick('m', 300, 8)
    before = t.estimate_s('m', 300, 8)
    t.observe('m', prompt_tps=None, gen_tps=None)  # a request without timings changes nothing
    assert t.estimate_s('m', 300, 8) == before
