"""Which non-streaming generations go to llama-server as they came and which are streamed from it and assembled
(`core/proxy/slot_time.py`), against the real llama-server: the client gets the same answer either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.proxy.slot_time import MAX_QUICK_BODY_BYTES, SlotTime, single_task, token_limit
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
    short = {'model': A, 'messages': HELLO, 'max_tokens': 4}
    cases = [
        # Over the size whose prompt speed can be guessed (the bulk is not prompt here: the context is small).
        ('/v1/chat/completions', {**short, 'max_tokens': 2, 'user': 'u' * MAX_QUICK_BODY_BYTES}, 2),
        # llama-server takes max_completion_tokens before max_tokens: this one runs to the context's end.
        ('/v1/chat/completions', {**short, 'max_tokens': 2, 'max_completion_tokens': 10**6, 'ignore_eos': True}, None),
        ('/v1/completions', {'model': A, 'prompt': ['one', 'two'], 'max_tokens': 2}, 2),  # two tasks
        ('/completion', {'model': A, 'prompt': 'hello', 'n_predict': 3}, 3),
    ]
    async with served.client() as c:
        assert (await c.post('/v1/chat/completions', json=short)).status_code == 200  # teaches the model's speed
        for route, body, tokens in cases:
            assert (await c.post('/v1/chat/completions', json=short)).status_code == 200  # plain: kept alive
            up = served.upstream(A)
            pool = served.system.proxy._client()
            assert pool.idle_count(up.host, up.port) == 1
            r = await c.post(route, json=body)
            assert r.status_code == 200, r.text
            answer = r.json()
            got = answer.get('tokens_predicted') or answer['usage']['completion_tokens']
            assert got == tokens if tokens is not None else got > 100
            if isinstance(body.get('prompt'), list):
                assert sorted(ch['index'] for ch in answer['choices']) == [0, 1]  # an answer to each prompt
            # The pooled connection carried it as a stream, which llama-server closes after: streamed and
            # assembled (the native route is quick: it went plain and the connection is kept).
            assert pool.idle_count(up.host, up.port) == (1 if route == '/completion' else 0)


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
    t.serving('m', pid=100)
    t.observe('m', prompt_tps=2000.0, gen_tps=100.0)
    assert t.quick('m', 300, 8)
    t.serving('m', pid=100)  # the same server
    assert t.quick('m', 300, 8)
    t.serving('m', pid=101)  # restarted (other parameters, perhaps off the GPU): measured again
    assert not t.quick('m', 300, 8)


@pytest.mark.parametrize(
    'body, limit',
    [
        ({'max_tokens': 8}, 8),
        ({'n_predict': 8}, 8),
        ({}, None),  # llama-server's default: to the end of the context
        ({'max_tokens': 8, 'max_completion_tokens': 100000}, 100000),
        ({'max_tokens': 8, 'n_predict': -1}, None),
        ({'max_tokens': 0}, None),
        ({'max_tokens': True}, None),
        ({'max_tokens': '8'}, None),
    ],
)
def test_token_limit_reads_every_field_llama_server_reads(body: dict[str, Any], limit: int | None) -> None:
    assert token_limit(body) == limit


@pytest.mark.parametrize(
    'body, single',
    [
        ({'prompt': 'one'}, True),
        ({'prompt': [1, 2, 3]}, True),  # one tokenized prompt
        ({'prompt': ['one']}, True),
        ({'prompt': ['one', 'two']}, False),
        ({'prompt': [[1, 2], [3]]}, False),
        ({'messages': [], 'n': 1}, True),
        ({'messages': [], 'n': 16}, False),
        ({'prompt': 'x', 'n_cmpl': 4}, False),
    ],
)
def test_a_request_of_several_tasks_is_never_quick(body: dict[str, Any], single: bool) -> None:
    assert single_task(body) == single
    t = SlotTime()
    t.observe('m', prompt_tps=1e6, gen_tps=1e6)
    assert t.quick_request('m', {**body, 'max_tokens': 1}, 100) == single
