"""The Ollama face against a real llama-server, through the clients people use: Ollama's own Python package (sync
and async) and LangChain's ChatOllama; the NDJSON framing read off a raw socket; a disconnect that stops the
generation; and what the listings say about the fixture models (from their GGUF metadata)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import ollama
import pytest

from core.supervisor import ModelState
from tests.conftest import SLOW_MODEL, wait_for
from tests.proxy_helpers import Served, serve
from tests.test_proxy_disconnect import PARAMS as SLOW_PARAMS
from tests.test_proxy_disconnect import idle_within

A, B = 'tiny-llama', 'tiny-llama-b'
MODELS = {A: {'embeddings': True, 'pooling': 'mean'}}
HI = [{'role': 'user', 'content': 'hi'}]


@pytest.fixture
async def served(system_factory: Any, models_dir: Path, tiny_model: Path, tiny_model_b: Path) -> Any:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, models=MODELS)
    async with serve(system) as s:
        yield s


async def test_the_async_client_lists_shows_chats_generates_and_embeds(served: Served) -> None:
    client = ollama.AsyncClient(host=served.base_url)
    listed = {m.model: m for m in (await client.list()).models}
    assert set(listed) == {f'{A}:latest', f'{B}:latest'}
    entry = served.system.library.get(A)
    tiny = listed[f'{A}:latest']
    assert tiny.size == entry.size_bytes and tiny.details.format == 'gguf'
    assert tiny.details.family == entry.meta.architecture == 'llama'
    assert tiny.details.quantization_level == entry.meta.file_type
    assert tiny.details.parameter_size  # from the metadata's parameter count
    assert tiny.modified_at is not None and abs(tiny.modified_at.timestamp() - entry.mtime) < 1

    shown = await client.show(f'{A}:latest')
    assert shown.modelinfo['general.architecture'] == 'llama'
    assert shown.modelinfo['llama.context_length'] == entry.meta.context_length
    assert shown.template == entry.chat_template and 'completion' in (shown.capabilities or [])
    assert 'num_ctx' in (shown.parameters or '')

    answer = await client.chat(model=A, messages=HI, options={'num_predict': 6, 'temperature': 0})
    assert answer.done and answer.message.role == 'assistant' and answer.message.content
    assert answer.eval_count == 6 and answer.done_reason == 'length'
    assert answer.prompt_eval_count and answer.eval_duration and answer.total_duration >= answer.eval_duration

    parts = [p async for p in await client.chat(model=A, messages=HI, options={'num_predict': 6}, stream=True)]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert ''.join(p.message.content or '' for p in parts) and parts[-1].eval_count == 6

    generated = await client.generate(model=A, prompt='Once upon', options={'num_predict': 5})
    assert generated.response and generated.eval_count == 5
    raw = await client.generate(model=A, prompt='Once upon', raw=True, options={'num_predict': 3})
    assert raw.response and raw.eval_count == 3

    embedded = await client.embed(model=A, input=['one', 'two words'])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == entry.meta.embedding_length
    legacy = await client.embeddings(model=A, prompt='one')
    assert legacy.embedding == pytest.approx(embedded.embeddings[0], abs=1e-4)

    running = (await client.ps()).models
    assert [m.model for m in running] == [f'{A}:latest'] and running[0].size
    assert running[0].context_length


async def test_the_sync_client_unknown_models_keep_alive_and_what_is_not_served(served: Served) -> None:
    await asyncio.to_thread(_sync_client_checks, served)  # the app serves on this loop meanwhile


def _sync_client_checks(served: Served) -> None:
    client = ollama.Client(host=served.base_url)
    assert {m.model for m in client.list().models} == {f'{A}:latest', f'{B}:latest'}
    assert client.show(A).details.family == 'llama'
    parts = list(client.chat(model=A, messages=HI, options={'num_predict': 3}, stream=True))
    assert parts[-1].done and parts[-1].eval_count == 3
    assert client.generate(model=A, prompt='Once', options={'num_predict': 2}).eval_count == 2
    assert len(client.embed(model=A, input='one').embeddings) == 1
    assert [m.model for m in client.ps().models] == [f'{A}:latest']
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model='no-such-model', messages=HI)
    assert unknown.value.status_code == 404 and 'no-such-model' in unknown.value.error

    reply = client.chat(model=f'{B}:latest', messages=HI, options={'num_predict': 2}, keep_alive=0)
    assert reply.done and reply.message.content is not None
    # keep_alive 0: unloaded once answered (the scheduler's TTL loop, woken by the release).
    deadline = time.monotonic() + 10
    while served.system.scheduler.describe(B)['status'] != ModelState.STOPPED:
        assert time.monotonic() < deadline, 'keep_alive 0 did not unload the model'
        time.sleep(0.02)

    client.generate(model=A, keep_alive='10m')  # no prompt: load it and keep it 10 minutes
    [running] = client.ps().models
    assert running.model == f'{A}:latest' and running.expires_at is not None
    left = running.expires_at.timestamp() - time.time()
    assert 590 < left <= 600
    assert client.generate(model=A, keep_alive=0).done_reason == 'unload'
    assert served.system.scheduler.describe(A)['status'] == ModelState.STOPPED

    with pytest.raises(ollama.ResponseError) as pull:
        client.pull('llama3')
    assert pull.value.status_code == 501 and 'models folder' in pull.value.error
    with pytest.raises(ollama.ResponseError) as delete:
        client.delete(A)
    assert delete.value.status_code == 501 and 'no model file is deleted' in delete.value.error
    assert served.system.library.get(A) is not None and Path(served.system.library.get(A).path).exists()

    with pytest.raises(ollama.ResponseError) as too_big:
        client.chat(model=A, messages=HI, options={'num_ctx': 10**6})
    assert too_big.value.status_code == 400 and 'ctx_size' in too_big.value.error


async def test_requests_are_recorded_like_v1_ones(served: Served) -> None:
    client = ollama.AsyncClient(host=served.base_url)
    await client.chat(model=A, messages=HI, options={'num_predict': 4})
    activity = served.system.proxy.activity
    rows = await wait_for(lambda: activity.recent(limit=5))
    row = rows[0]
    assert row['route'] == '/api/chat' and row['model'] == A and row['status'] == 200
    assert row['completion_tokens'] == 4 and row['prompt_tokens']


async def test_langchain_chat_ollama_invoke_and_stream(served: Served) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=A, base_url=served.base_url, num_predict=5, temperature=0)
    message = await llm.ainvoke('hello there')
    assert message.content and message.usage_metadata['output_tokens'] == 5
    chunks = [c async for c in llm.astream('hello there')]
    assert len(chunks) >= 2 and ''.join(str(c.content) for c in chunks)


def _ndjson_lines(port: int, body: dict[str, Any]) -> list[tuple[int, bytes]]:
    """POST on a raw socket; each complete line of the (chunked) body with the number of the read that completed
    it."""
    data = json.dumps(body).encode()
    head = (
        f'POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
        f'Content-Length: {len(data)}\r\nConnection: close\r\n\r\n'
    ).encode()
    out: list[tuple[int, bytes]] = []
    reads = 0
    with socket.create_connection(('127.0.0.1', port), timeout=60) as sock:
        sock.sendall(head + data)
        raw = b''
        while b'\r\n\r\n' not in raw:
            raw += sock.recv(65536)
        headers, rest = raw.split(b'\r\n\r\n', 1)
        assert b' 200 ' in headers.split(b'\r\n')[0] and b'application/x-ndjson' in headers.lower()
        assert b'transfer-encoding: chunked' in headers.lower()
        body_bytes, pending = b'', rest
        while True:
            # De-chunk what has arrived, then split into lines.
            while b'\r\n' in pending:
                size_line, after = pending.split(b'\r\n', 1)
                size = int(size_line, 16)
                if len(after) < size + 2:
                    break
                if size == 0:
                    return out
                body_bytes += after[:size]
                pending = after[size + 2 :]
                while b'\n' in body_bytes:
                    line, body_bytes = body_bytes.split(b'\n', 1)
                    out.append((reads, line))
            more = sock.recv(65536)
            if not more:
                return out
            reads += 1
            pending += more


async def test_ndjson_is_one_object_per_line_sent_as_each_token_comes(system_factory: Any, slow_models: Path) -> None:
    system = await system_factory(models_dirs=[slow_models], scan_well_known_dirs=False, models=SLOW_PARAMS)
    async with serve(system) as s:
        port = int(s.base_url.rsplit(':', 1)[1])
        body = {'model': SLOW_MODEL, 'messages': HI, 'options': {'num_predict': 200}}
        lines = await asyncio.to_thread(_ndjson_lines, port, body)
    objects = [json.loads(line) for _, line in lines]  # each line is one whole JSON object
    assert [o['done'] for o in objects] == [False] * (len(objects) - 1) + [True]
    tokens = [read for (read, _), o in zip(lines, objects, strict=True) if not o['done']]
    assert len(tokens) >= 150  # a line per token (but those whose text is empty)
    # Sent as they come: the lines reach the socket in many reads over the generation, not in one at its end (a
    # busy machine may put a few tokens in one read; the proxy relays what each of llama-server's writes holds).
    assert len(set(tokens)) > len(tokens) // 4, (len(set(tokens)), len(tokens))


async def test_a_client_gone_mid_stream_stops_the_generation(system_factory: Any, slow_models: Path) -> None:
    system = await system_factory(models_dirs=[slow_models], scan_well_known_dirs=False, models=SLOW_PARAMS)
    async with serve(system) as s:
        client = ollama.AsyncClient(host=s.base_url)
        options = {'num_predict': 12000}
        stream = await client.chat(model=SLOW_MODEL, messages=HI, options=options, stream=True, think=False)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()  # the connection goes with it
        await idle_within(s, 2.5)  # an uncancelled generation of 12000 tokens holds the slot far longer
        row = (await wait_for(lambda: s.system.proxy.activity.recent(limit=1)))[0]
        assert row['route'] == '/api/chat' and row['error'] == 'client disconnected'


async def test_images_for_a_model_without_a_projector_are_refused_clearly(served: Served) -> None:
    client = ollama.AsyncClient(host=served.base_url)
    png = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=='
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat(model=A, messages=[{'role': 'user', 'content': 'what is it?', 'images': [png]}])
    assert refused.value.status_code == 400 and 'mmproj' in refused.value.error


async def test_an_unload_request_waits_for_the_answers_in_flight(system_factory: Any, slow_models: Path) -> None:
    """`{"model": m, "keep_alive": 0}` (how Open WebUI unloads) while another client's answer streams: that answer
    ends whole, then the model unloads."""
    system = await system_factory(models_dirs=[slow_models], scan_well_known_dirs=False, models=SLOW_PARAMS)
    async with serve(system) as s:
        client = ollama.AsyncClient(host=s.base_url)
        stream = await client.chat(model=SLOW_MODEL, messages=HI, options={'num_predict': 400}, stream=True)
        first = await anext(aiter(stream))
        assert not first.done
        unloaded = await client.generate(model=SLOW_MODEL, keep_alive=0)
        assert unloaded.done_reason == 'unload'
        parts = [p async for p in stream]
        assert parts[-1].done and parts[-1].done_reason == 'length'  # not cut
        await wait_for(lambda: system.scheduler.describe(SLOW_MODEL)['status'] == ModelState.STOPPED, 10)


async def test_embeddings_from_a_model_not_started_for_them_say_what_to_turn_on(served: Served) -> None:
    client = ollama.AsyncClient(host=served.base_url)
    with pytest.raises(ollama.ResponseError) as refused:
        await client.embed(model=B, input='one')
    assert refused.value.status_code == 400 and "turn on 'embeddings'" in refused.value.error
    async with served.client() as raw:  # Ollama's client refuses an empty name itself; others may send one
        unnamed = await raw.post('/api/embed', json={'model': '', 'input': 'one'})
    assert unnamed.status_code == 400 and 'names no "model"' in unnamed.json()['error']
