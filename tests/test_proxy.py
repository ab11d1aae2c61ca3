"""The proxy end to end: the real System (library + scheduler + real llama-server on the tiny models) served over
HTTP, driven with the official `openai` client and plain HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.request_params import RequestParams, apply
from tests.conftest import wait_for
from tests.proxy_helpers import Served, serve
from tests.supervisor_helpers import direct

A, B = 'tiny-llama', 'tiny-llama-b'
EMBED = {A: {'embeddings': True, 'pooling': 'mean'}}


@pytest.fixture
async def served(system_factory: Any, models_dir: Path, tiny_model: Path, tiny_model_b: Path, request: Any) -> Any:
    extra = getattr(request, 'param', {}) or {}
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, **extra)
    async with serve(system) as s:
        yield s


def oai(s: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f'{s.base_url}/v1', api_key='unused', max_retries=0)


async def finished(s: Served, n: int) -> list[dict[str, Any]]:
    """The newest `n` finished requests, waiting until that many are recorded."""

    async def rows() -> list[dict[str, Any]] | None:
        async with s.client() as c:
            data = (await c.get('/api/requests', params={'limit': 100})).json()['requests']
        return data if len(data) >= n else None

    return await wait_for(rows)


async def test_models_list_shows_every_discovered_model(served: Served) -> None:
    async with oai(served) as client:
        page = await client.models.list()
    by_id = {m.id: m.model_dump() for m in page.data}
    assert {A, B} <= set(by_id)
    card = by_id[A]
    assert card['status'] == 'stopped'  # listed although nothing is loaded
    assert card['context_length'] == 2048 and card['meta']['n_ctx'] == 2048
    assert card['architecture']['input_modalities'] == ['text']
    assert card['size'] == Path(served.system.library.get(A).path).stat().st_size


@pytest.mark.parametrize('served', [{'models': EMBED}], indirect=True)
async def test_openai_client_chat_completions_embeddings(served: Served) -> None:
    async with oai(served) as client:
        await _chat_completions_embeddings(served, client)


async def _chat_completions_embeddings(served: Served, client: openai.AsyncOpenAI) -> None:
    assert served.system.scheduler.describe(A)['status'] == 'stopped'

    chat = await client.chat.completions.create(
        model=A, messages=[{'role': 'user', 'content': 'hello'}], max_tokens=6, temperature=0
    )
    assert served.system.scheduler.describe(A)['status'] == 'ready'  # started on demand
    assert chat.object == 'chat.completion'
    assert chat.model == A  # named by the id the client used, not llama-server's file path
    assert chat.choices[0].message.role == 'assistant' and chat.choices[0].message.content
    assert chat.choices[0].finish_reason == 'length'
    assert chat.usage is not None and chat.usage.completion_tokens == 6 and chat.usage.prompt_tokens > 0
    async with direct(served.upstream(A)) as own:  # assembled from the stream: the same text, every token
        body = {'messages': [{'role': 'user', 'content': 'hello'}], 'max_tokens': 6, 'temperature': 0}
        plain = (await own.post('/v1/chat/completions', json=body)).json()
    assert chat.choices[0].message.content == plain['choices'][0]['message']['content']

    stream = await client.chat.completions.create(
        model=A,
        messages=[{'role': 'user', 'content': 'hello'}],
        max_tokens=6,
        stream=True,
        stream_options={'include_usage': True},
    )
    text, reasons, usage = [], [], None
    async for chunk in stream:
        for ch in chunk.choices:
            text.append(ch.delta.content or '')
            reasons.append(ch.finish_reason)
        usage = chunk.usage or usage
    assert ''.join(text) and reasons[-1] == 'length'
    assert usage is not None and usage.completion_tokens == 6

    comp = await client.completions.create(model=A, prompt='Once upon a time', max_tokens=4)
    assert comp.choices[0].text and comp.usage is not None and comp.usage.completion_tokens == 4

    emb = await client.embeddings.create(model=A, input=['one', 'two words'])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
    assert emb.data[0].embedding != emb.data[1].embedding

    rows = {r['route']: r for r in await finished(served, 4)}
    chat_row = rows['/v1/chat/completions']
    assert chat_row['model'] == A and chat_row['status'] == 200
    assert chat_row['completion_tokens'] == 6 and chat_row['prompt_tokens'] > 0
    assert chat_row['gen_tps'] > 0 and chat_row['prompt_tps'] > 0 and chat_row['ttft_s'] > 0
    assert rows['/v1/embeddings']['status'] == 200


async def test_two_models_in_turn_and_native_routes(served: Served) -> None:
    async with served.client() as c:
        for model in (A, B, A):
            r = await c.post('/completion', json={'model': model, 'prompt': 'hi', 'n_predict': 3})
            assert r.status_code == 200, r.text
            assert r.json()['tokens_predicted'] == 3 and 'timings' in r.json()
            assert served.system.scheduler.describe(model)['status'] == 'ready'

        r = await c.post(f'/upstream/{B}/tokenize', json={'content': 'hello world'})
        assert r.status_code == 200 and r.json()['tokens']
        r = await c.post('/detokenize', json={'model': B, 'tokens': r.json()['tokens']})
        assert r.status_code == 200 and 'hello' in r.json()['content']
        r = await c.get(f'/upstream/{B}/slots')
        assert r.status_code == 200 and all('is_processing' in s for s in r.json())
        r = await c.get(f'/upstream/{B}/props')
        assert r.status_code == 200 and 'default_generation_settings' in r.json()
        r = await c.get(f'/upstream/{B}/no such page/ü')  # passed on, still percent-encoded: llama-server's 404
        assert r.status_code == 404


async def test_anthropic_messages(served: Served) -> None:
    async with served.client() as c:
        body = {'model': A, 'max_tokens': 5, 'messages': [{'role': 'user', 'content': 'hi'}]}
        r = await c.post(
            '/v1/messages', json=body, headers={'x-api-key': 'anything', 'anthropic-version': '2023-06-01'}
        )
        assert r.status_code == 200, r.text
        msg = r.json()
        assert msg['type'] == 'message' and msg['content'][0]['type'] == 'text'
        assert msg['usage']['output_tokens'] == 5

        async with c.stream('POST', '/v1/messages', json={**body, 'stream': True}) as r:
            assert r.status_code == 200
            assert r.headers['cache-control'] == 'no-cache' and r.headers['x-accel-buffering'] == 'no'
            events = [line[7:] async for line in r.aiter_lines() if line.startswith('event: ')]
        assert events[0] == 'message_start' and events[-1] == 'message_stop'

        r = await c.post('/v1/messages/count_tokens', json={'model': A, 'messages': body['messages']})
        assert r.status_code == 200 and r.json()['input_tokens'] > 0
    rows = await finished(served, 3)
    assert {r['route'] for r in rows} >= {'/v1/messages', '/v1/messages/count_tokens'}
    stream_row = next(r for r in rows if r['route'] == '/v1/messages' and r['stream'])
    assert stream_row['completion_tokens'] == 5


@pytest.mark.parametrize('served', [{'max_body_bytes': 4096, 'concurrency_limit': 1}], indirect=True)
async def test_error_shapes(served: Served) -> None:
    def shape(r: httpx.Response) -> dict[str, Any]:
        err = r.json()['error']
        assert set(err) == {'message', 'type', 'code'}
        return err

    async with served.client() as c:
        r = await c.post('/v1/chat/completions', json={'model': 'no-such-model', 'messages': []})
        assert r.status_code == 404 and A in shape(r)['message'] and B in shape(r)['message']
        r = await c.post('/v1/chat/completions', content=b'{"model": ', headers={'content-type': 'application/json'})
        assert r.status_code == 400 and shape(r)['code'] == 'invalid_json'
        r = await c.post(
            '/v1/chat/completions', json={'model': A, 'messages': [{'role': 'user', 'content': 'x' * 5000}]}
        )
        assert r.status_code == 413 and shape(r)['code'] == 'body_too_large'
        r = await c.get('/upstream/no-such-model/slots')
        assert r.status_code == 404 and A in shape(r)['message']

        # One stream in flight fills concurrency_limit=1: the next request for that model gets 429.
        body = {'model': A, 'prompt': 'a', 'n_predict': 2000, 'ignore_eos': True, 'stream': True}
        async with c.stream('POST', '/completion', json=body) as held:
            assert held.status_code == 200
            r = await c.post('/completion', json={'model': A, 'prompt': 'b', 'n_predict': 1})
            assert r.status_code == 429 and r.headers['retry-after'] == '1'
            assert shape(r)['type'] == 'rate_limit_error'
        await wait_for(lambda: not served.system.proxy.activity.inflight())
        r = await c.post('/completion', json={'model': A, 'prompt': 'b', 'n_predict': 1})
        assert r.status_code == 200  # the slot was freed when the held stream closed
    statuses = [row['status'] for row in await finished(served, 6)]
    assert {404, 400, 413, 429, 200} <= set(statuses)


async def test_start_failure_is_503_with_reason(served: Served, tmp_path: Path) -> None:
    lib = served.system.library
    broken = Path(lib.get(A).path)
    async with served.client() as c:
        # Point the model at a file that is not a GGUF: llama-server exits at once and the reason is reported.
        original = broken.read_bytes()
        try:
            broken.write_bytes(b'not a gguf' * 100)
            r = await c.post('/v1/chat/completions', json={'model': A, 'messages': [{'role': 'user', 'content': 'x'}]})
        finally:
            broken.write_bytes(original)
    assert r.status_code == 503, r.text
    assert r.json()['error']['type'] == 'unavailable_error' and A in r.json()['error']['message']


async def test_request_params_applied_and_changed_live(served: Served) -> None:
    def set_cap(cap: int) -> None:
        request = {'defaults': {'temperature': 0}, 'force': {'n_probs': 0}, 'max_tokens_cap': cap}
        served.system.config.update({'models': {A: {'request': request}}})

    async with served.client() as c:
        body = {'model': A, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 50}
        set_cap(3)
        r = await c.post('/v1/chat/completions', json=body)
        assert r.json()['usage']['completion_tokens'] == 3  # capped
        set_cap(5)
        r = await c.post('/v1/chat/completions', json=body)
        assert r.json()['usage']['completion_tokens'] == 5  # the new cap, no restart
        assert served.system.scheduler.describe(A)['restarts'] == 0


def test_apply_request_params() -> None:
    params = RequestParams(
        defaults={'temperature': 0.2, 'top_k': 5}, force={'seed': 1}, strip=['logit_bias'], max_tokens_cap=100
    )
    body = {'temperature': 0.9, 'logit_bias': {'1': 2}, 'max_tokens': -1}
    out = apply(body, params)
    assert out == {'temperature': 0.9, 'top_k': 5, 'seed': 1, 'max_tokens': 100}
    assert body == {'temperature': 0.9, 'logit_bias': {'1': 2}, 'max_tokens': -1}  # the client's dict untouched
    assert apply({'n_predict': 10}, params, 'n_predict') == {'n_predict': 10, 'temperature': 0.2, 'top_k': 5, 'seed': 1}
    assert apply({}, RequestParams(max_tokens_cap=7), 'n_predict') == {'n_predict': 7}


async def test_events_and_stats(served: Served) -> None:
    sub = served.system.bus.queue(['requests'])
    async with served.client() as c:
        r = await c.post('/completion', json={'model': A, 'prompt': 'hi', 'n_predict': 2})
        assert r.status_code == 200
    started = await asyncio.wait_for(sub.get(), 5)
    done = await asyncio.wait_for(sub.get(), 5)
    assert started.type == 'started' and 'status' not in started.data and started.data['model'] == A
    assert done.type == 'finished' and done.data['status'] == 200 and done.data['completion_tokens'] == 2
    assert done.data['id'] == started.data['id'] and done.data['duration_s'] > 0
    stats = served.system.proxy.stats()
    assert stats['requests_total'] == 1 and stats['in_flight'] == 0 and stats['p50_latency_s'] > 0
    assert json.dumps(stats)


def test_time_to_first_token_skips_progress_events_only() -> None:
    # A network read may hold progress events and the first token together; that read is the first token.
    from core.proxy.service import has_output

    progress = b'data: {"prompt_progress":{"total":90,"cache":0,"processed":64,"time_ms":3.1}}\n\n'
    token = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"object":"chat.completion.chunk"}\n\n'
    assert not has_output(progress) and not has_output(progress * 3)
    assert has_output(token) and has_output(progress * 2 + token)


def test_token_counts_are_read_from_the_tail_of_a_json_reply() -> None:
    from core.proxy.sse import json_usage, usage_stats

    vectors = [{'object': 'embedding', 'index': i, 'embedding': [0.125] * 4096} for i in range(8)]
    body = json.dumps({'object': 'list', 'data': vectors, 'usage': {'prompt_tokens': 12, 'total_tokens': 12}})
    assert usage_stats(json_usage(body.encode())) == {'prompt_tokens': 12}
    assert json_usage(b'{"object": "list", "data": []}') == []
    assert json_usage(b'{"usage": {"prompt_tokens": 3, "total') == []  # cut short: nothing, and no error


@pytest.mark.parametrize('served', [{'send_loading_state': True}], indirect=True)
async def test_loading_progress_streams_before_the_answer(served: Served) -> None:
    # The model is stopped: with send_loading_state, a streaming chat client sees the load as reasoning deltas.
    assert served.system.scheduler.describe(B)['status'] == 'stopped'
    async with oai(served) as client:
        stream = await client.chat.completions.create(
            model=B, messages=[{'role': 'user', 'content': 'hello'}], max_tokens=4, stream=True
        )
        reasoning, content = [], []
        async for chunk in stream:
            for ch in chunk.choices:
                delta = ch.delta.model_dump()
                if delta.get('reasoning_content'):
                    assert not content  # all loading news comes before the answer
                    reasoning.append(delta['reasoning_content'])
                if delta.get('content'):
                    content.append(delta['content'])
    assert reasoning and all(text.startswith(f'Loading {B}') for text in reasoning)
    assert ''.join(content)
    assert served.system.scheduler.describe(B)['status'] == 'ready'


async def test_remaining_routes_reach_llama_server(served: Served) -> None:
    msgs = [{'role': 'user', 'content': 'hello'}]
    async with served.client() as c:
        r = await c.post('/apply-template', json={'model': A, 'messages': msgs})
        assert r.status_code == 200 and 'hello' in r.json()['prompt']
        r = await c.post('/v1/responses', json={'model': A, 'input': 'hello', 'max_output_tokens': 3})
        assert r.status_code == 200, r.text
        assert r.json()['object'] == 'response' and r.json()['output']
        # No reranking model and no FIM tokens in the tiny model: llama-server's own refusal comes back, in the
        # OpenAI error shape, not the proxy's "no such endpoint".
        for path, body in (
            ('/v1/rerank', {'model': A, 'query': 'q', 'documents': ['a', 'b']}),
            ('/infill', {'model': A, 'input_prefix': 'def f(', 'input_suffix': ')'}),
        ):
            r = await c.post(path, json=body)
            assert 400 <= r.status_code < 600 and r.status_code != 404, (path, r.status_code, r.text)
            assert r.json()['error']['message'] and r.json()['error'].get('code') != 'unknown_endpoint'
    rows = await finished(served, 4)
    assert {'/apply-template', '/v1/responses', '/v1/rerank', '/infill'} <= {row['route'] for row in rows}
