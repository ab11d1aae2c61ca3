"""Remote upstreams (issue 17, part 1): an OpenAI-compatible server, scripted, and a second real llama-server,
configured as remotes and used through this app's /v1 like its own models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, wait_for
from tests.fake_openai import FakeOpenAI

APP_KEY = 'app-key-for-clients'


def remote(fake: FakeOpenAI, **more: Any) -> dict[str, Any]:
    return {'name': 'cloud', 'url': fake.url, 'api_key': fake.key, 'prefix': 'cloud', 'check_interval': 0.5, **more}


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.get('/v1/models')
    assert r.status_code == 200
    return {m['id']: m for m in r.json()['data']}


@pytest.fixture
async def fake() -> Any:
    server = await FakeOpenAI(chunk_delay_s=0.01).start()
    yield server
    await server.stop()


async def test_a_remote_servers_models_are_listed_and_served_like_local_ones(
    make_served: Any, fake: FakeOpenAI
) -> None:
    async with await make_served(api_keys=[APP_KEY], remotes=[remote(fake, aliases={'smart': 'gpt-fake'})]) as s:
        async with s.client(headers={'Authorization': f'Bearer {APP_KEY}'}) as c:
            models = await wait_for(lambda: _listed_with(c, 'cloud/gpt-fake'))
            assert models['cloud/gpt-fake']['owned_by'] == 'cloud'
            assert models['cloud/embed-fake']['remote']['state'] == 'up'
            assert 'smart' in models
            assert 'tiny-llama' in models  # the local ones stay listed first

            r = await c.post('/v1/chat/completions', json={'model': 'cloud/gpt-fake', 'messages': [_hi()]})
            assert r.status_code == 200, r.text
            assert r.json()['choices'][0]['message']['content'] == 'w0 w1 w2 w3 w4 '
            seen = fake.seen[-1]
            assert seen.body['model'] == 'gpt-fake'  # its own name, not ours
            assert seen.headers['Authorization'] == f'Bearer {fake.key}'  # its key, never the client's
            assert APP_KEY not in json.dumps(seen.headers)

            r = await c.post('/v1/chat/completions', json={'model': 'smart', 'messages': [_hi()]})
            assert r.status_code == 200 and fake.seen[-1].body['model'] == 'gpt-fake'

            async with c.stream(
                'POST', '/v1/chat/completions', json={'model': 'cloud/gpt-fake', 'messages': [_hi()], 'stream': True}
            ) as r:
                assert r.status_code == 200
                assert r.headers['content-type'].startswith('text/event-stream')
                events = [line async for line in r.aiter_lines() if line.startswith('data: ')]
            assert events[-1] == 'data: [DONE]'
            assert sum('"content"' in e for e in events) == 5

            r = await c.post('/v1/embeddings', json={'model': 'cloud/embed-fake', 'input': 'hello'})
            assert r.status_code == 200 and r.json()['data'][0]['embedding'] == [0.25, -0.5, 1.0]

            rows = await wait_for(lambda: _requests(c, upstream='cloud', expect=4))
            assert {row['model'] for row in rows} == {'cloud/gpt-fake', 'smart', 'cloud/embed-fake'}
            assert all(row['status'] == 200 and row['upstream'] == 'cloud' for row in rows)
            assert next(r for r in rows if r['stream'])['completion_tokens'] == 5
            local = (await c.get('/api/requests', params={'upstream': 'local'})).json()['requests']
            assert all(row['upstream'] is None for row in local)

            metrics = (await c.get('/metrics')).text  # Prometheus: counted with the upstream's name
            assert any(
                line.startswith('lap_proxy_requests_total{')
                and 'model="cloud/gpt-fake"' in line
                and 'upstream="cloud"' in line
                for line in metrics.splitlines()
            ), metrics[-2000:]

            nodes = (await c.get('/api/nodes')).json()['remotes']
            assert nodes[0]['name'] == 'cloud' and nodes[0]['state'] == 'up'
            assert fake.key not in json.dumps(nodes)


async def test_a_local_model_wins_over_an_openai_server_with_the_same_name(make_served: Any) -> None:
    same = await FakeOpenAI(models=['tiny-llama']).start()
    try:
        other = {'name': 'same', 'url': same.url, 'api_key': same.key, 'check_interval': 0.5}
        async with await make_served(remotes=[other]) as s:
            async with s.client() as c:
                await wait_for(lambda: _state(c, 'same', 'up'))
                body = {'model': 'tiny-llama', 'messages': [_hi()], 'max_tokens': 2}
                assert (await c.post('/v1/chat/completions', json=body)).status_code == 200
                assert same.seen == []  # served here, by its own llama-server
                row = (await wait_for(lambda: _requests(c, upstream='local', expect=1)))[0]
                assert row['model'] == 'tiny-llama'
                listed = [m for m in (await c.get('/v1/models')).json()['data'] if m['id'] == 'tiny-llama']
                assert [m['owned_by'] for m in listed] == ['llama-async-proxy']  # listed once, as this app's
    finally:
        await same.stop()


async def test_a_client_that_goes_away_ends_the_remote_stream(make_served: Any, fake: FakeOpenAI) -> None:
    fake.chunks, fake.chunk_delay_s = 200, 0.02  # 4 s if nobody stops it
    async with await make_served(remotes=[remote(fake)]) as s:
        async with s.client() as c:
            await wait_for(lambda: _listed_with(c, 'cloud/gpt-fake'))
            body = {'model': 'cloud/gpt-fake', 'messages': [_hi()], 'stream': True}
            async with c.stream('POST', '/v1/chat/completions', json=body) as r:
                async for line in r.aiter_lines():
                    if '"content"' in line:
                        break  # one token, then hang up
        await wait_for(lambda: fake.disconnects == 1, deadline_s=2)
        async with s.client() as c:
            row = (await wait_for(lambda: _requests(c, upstream='cloud', expect=1)))[0]
        assert row['status'] == 499


async def test_a_remote_that_goes_down_answers_503_and_comes_back_by_itself(make_served: Any, fake: FakeOpenAI) -> None:
    async with await make_served(remotes=[remote(fake)]) as s:
        async with s.client() as c:
            await wait_for(lambda: _listed_with(c, 'cloud/gpt-fake'))
            await fake.stop()
            body = {'model': 'cloud/gpt-fake', 'messages': [_hi()]}
            r = await c.post('/v1/chat/completions', json=body)
            assert r.status_code == 503
            err = r.json()['error']
            assert 'cloud' in err['message'] and err['type'] == 'unavailable_error'
            state = (await c.get('/api/nodes/cloud')).json()
            assert state['state'] == 'down' and state['error']
            assert (await listed(c))['cloud/gpt-fake']['status'] == 'down'
            r = await c.post('/v1/chat/completions', json=body)  # known down: refused at once, clearly
            assert r.status_code == 503 and 'not reachable' in r.json()['error']['message']

            await fake.start()
            await wait_for(lambda: _state(c, 'cloud', 'up'), deadline_s=10)
            r = await c.post('/v1/chat/completions', json=body)
            assert r.status_code == 200, r.text


async def test_a_wrong_key_for_the_remote_is_told_as_such(make_served: Any, fake: FakeOpenAI) -> None:
    async with await make_served(remotes=[remote(fake, api_key='not-its-key', models=['gpt-fake'])]) as s:
        async with s.client() as c:
            state = await wait_for(lambda: _state(c, 'cloud', 'down'))
            assert 'api_key' in state['error']


async def test_remote_keys_are_never_shown_and_survive_an_export_round_trip(make_served: Any, fake: FakeOpenAI) -> None:
    async with await make_served() as s:
        async with s.client() as c:
            r = await c.put('/api/config', json={'remotes': [remote(fake)]})
            assert r.status_code == 200 and fake.key not in r.text
            shown = (await c.get('/api/config')).json()['settings']['remotes']
            assert shown[0]['api_key'] == '***'
            exported = (await c.get('/api/config/export')).json()
            assert fake.key not in json.dumps(exported)
            exported['remotes'][0]['prefix'] = 'renamed'
            r = await c.put('/api/config', json={'remotes': exported['remotes']})
            assert r.status_code == 200, r.text
            assert fake.key not in r.text
            assert s.system.config.settings.remotes[0].api_key == fake.key  # `***` kept the saved key
            await wait_for(lambda: _listed_with(c, 'renamed/gpt-fake'))  # applied live
            r = await c.post('/v1/chat/completions', json={'model': 'renamed/gpt-fake', 'messages': [_hi()]})
            assert r.status_code == 200

            # The saved key never follows a remote to a new address.
            moved = [{**exported['remotes'][0], 'url': 'http://198.51.100.7:8000/v1'}]
            r = await c.put('/api/config', json={'remotes': moved})
            assert r.status_code == 422 and 'give the key again' in r.text
            r = await c.post('/api/config/import', json={**exported, 'remotes': moved})
            assert r.status_code == 422 and 'give the key again' in r.text
            assert s.system.config.settings.remotes[0].url == fake.url
            r = await c.put('/api/config', json={'remotes': [{**remote(fake), 'api_key': 'two\r\nX-Evil: 1'}]})
            assert r.status_code == 422  # a key goes in a header line as it is

            r = await c.put('/api/config', json={'remotes': [{'name': 'bad name', 'url': 'ftp://x'}]})
            assert r.status_code == 422
            fields = json.dumps(r.json())
            assert 'remotes' in fields and 'http://' in fields


async def test_an_https_remote_is_verified_against_its_ca_file(make_served: Any, tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert('127.0.0.1').configure_cert(server_ctx)
    ca_file = tmp_path / 'ca.pem'
    ca.cert_pem.write_to_path(str(ca_file))
    fake = await FakeOpenAI(tls=server_ctx).start()
    try:
        trusted = remote(fake, name='tls', prefix='tls', ca_file=str(ca_file))
        untrusted = remote(fake, name='unknown-ca', prefix='other')
        async with await make_served(remotes=[trusted, untrusted]) as s:
            async with s.client() as c:
                await wait_for(lambda: _listed_with(c, 'tls/gpt-fake'))
                r = await c.post('/v1/chat/completions', json={'model': 'tls/gpt-fake', 'messages': [_hi()]})
                assert r.status_code == 200, r.text
                async with c.stream(
                    'POST', '/v1/chat/completions', json={'model': 'tls/gpt-fake', 'messages': [_hi()], 'stream': True}
                ) as r:
                    assert r.status_code == 200
                    assert [x async for x in r.aiter_lines() if x.startswith('data: ')][-1] == 'data: [DONE]'
                state = await wait_for(lambda: _state(c, 'unknown-ca', 'down'))
                assert 'certificate' in state['error'].lower()  # a certificate it cannot verify is refused
    finally:
        await fake.stop()


async def test_a_request_fails_over_to_another_remote_holding_the_model(make_served: Any) -> None:
    first, second = await FakeOpenAI().start(), await FakeOpenAI().start()
    try:
        # No prefix: both list gpt-fake, replicas of one model. A slow check leaves a dead one marked up.
        a = {'name': 'a', 'url': first.url, 'api_key': first.key, 'check_interval': 3600}
        b = {'name': 'b', 'url': second.url, 'api_key': second.key, 'check_interval': 3600}
        async with await make_served(remotes=[a, b]) as s:
            async with s.client() as c:
                await wait_for(lambda: _all_up(c, 'a', 'b'))
                body = {'model': 'gpt-fake', 'messages': [_hi()]}
                assert (await c.post('/v1/chat/completions', json=body)).status_code == 200
                served_first = 'a' if first.seen else 'b'
                await (first if served_first == 'a' else second).stop()
                r = await c.post('/v1/chat/completions', json=body)
                assert r.status_code == 200, r.text  # the other one answered
                assert (await c.get(f'/api/nodes/{served_first}')).json()['state'] == 'down'
                rows = await wait_for(lambda: _requests(c, upstream='b' if served_first == 'a' else 'a', expect=1))
                assert rows[0]['status'] == 200
    finally:
        await first.stop()
        await second.stop()


async def test_a_remote_that_refuses_is_passed_over_and_request_params_apply(make_served: Any) -> None:
    full, good = await FakeOpenAI(refuse=503).start(), await FakeOpenAI().start()
    try:
        a = {'name': 'full', 'url': full.url, 'api_key': full.key, 'check_interval': 3600}
        b = {'name': 'good', 'url': good.url, 'api_key': good.key, 'check_interval': 3600}
        forced = {'defaults': {'request': {'force': {'temperature': 0.25}, 'max_tokens_cap': 7}}}
        async with await make_served(remotes=[a, b], **forced) as s:
            async with s.client() as c:
                await wait_for(lambda: _all_up(c, 'full', 'good'))
                for _ in range(3):  # whichever is tried first, the answer comes from the one that can
                    r = await c.post('/v1/chat/completions', json={'model': 'gpt-fake', 'messages': [_hi()]})
                    assert r.status_code == 200, r.text
                assert good.seen and all(x.body['temperature'] == 0.25 and x.body['max_tokens'] == 7 for x in good.seen)
                assert (await c.get('/api/nodes/full')).json()['state'] == 'up'  # it answered: not down
                await good.stop()
                r = await c.post('/v1/chat/completions', json={'model': 'gpt-fake', 'messages': [_hi()]})
                assert r.status_code == 503 and 'refused with 503' in r.text  # the reason, from the one that answered
    finally:
        await full.stop()
        await good.stop()


async def test_a_real_llama_server_as_a_remote_upstream(
    make_served: Any, llama_binary: Any, tiny_model: Path, tmp_path: Path
) -> None:
    from tests.conftest import start_llama_server, stop_process

    server: RunningServer = await asyncio.to_thread(
        start_llama_server,
        llama_binary,
        tiny_model,
        '--api-key',
        'box-key',
        '--embeddings',
        '--pooling',
        'mean',
        '-np',
        '2',
    )
    try:
        other = {'name': 'box', 'url': server.base_url, 'api_key': 'box-key', 'prefix': 'box', 'check_interval': 0.5}
        async with await make_served(remotes=[other]) as s:
            async with s.client() as c:
                models = await wait_for(lambda: _listed_with(c, 'box/'))  # llama-server's name for its model
                name = next(m for m in models if m.startswith('box/'))
                body = {'model': name, 'messages': [_hi()], 'max_tokens': 4, 'temperature': 0}
                r = await c.post('/v1/chat/completions', json=body)
                assert r.status_code == 200, r.text
                assert r.json()['usage']['completion_tokens'] >= 1
                async with c.stream('POST', '/v1/chat/completions', json={**body, 'stream': True}) as r:
                    events = [line async for line in r.aiter_lines() if line.startswith('data: ')]
                assert r.status_code == 200 and events[-1] == 'data: [DONE]'
                r = await c.post('/v1/embeddings', json={'model': name, 'input': 'hello'})
                assert r.status_code == 200 and len(r.json()['data'][0]['embedding']) > 0
                assert s.system.scheduler.running() == []  # served there, nothing started here

                # Cancel: a long stream, cut after its first token, frees the remote server's slot.
                long = {**body, 'max_tokens': 4000, 'stream': True}
                async with c.stream('POST', '/v1/chat/completions', json=long) as r:
                    async for line in r.aiter_lines():
                        if '"content"' in line:
                            break
                async with httpx.AsyncClient(headers={'Authorization': 'Bearer box-key'}) as direct:
                    await wait_for(lambda: _slots_idle(direct, server.base_url), deadline_s=3)

                stop_process(server.proc)
                r = await c.post('/v1/chat/completions', json=body)
                assert r.status_code == 503 and 'box' in r.json()['error']['message']
    finally:
        stop_process(server.proc)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _hi() -> dict[str, str]:
    return {'role': 'user', 'content': 'hi'}


async def _listed_with(c: httpx.AsyncClient, name: str) -> dict[str, dict[str, Any]] | None:
    models = await listed(c)
    return models if any(m == name or m.startswith(name) for m in models) else None


async def _requests(c: httpx.AsyncClient, upstream: str, expect: int) -> list[dict[str, Any]] | None:
    rows = (await c.get('/api/requests', params={'upstream': upstream})).json()['requests']
    return rows if len(rows) >= expect else None


async def _state(c: httpx.AsyncClient, name: str, state: str) -> dict[str, Any] | None:
    r = (await c.get(f'/api/nodes/{name}')).json()
    return r if r['state'] == state else None


async def _all_up(c: httpx.AsyncClient, *names: str) -> bool:
    return all([await _state(c, name, 'up') for name in names])


async def _slots_idle(c: httpx.AsyncClient, base: str) -> bool:
    slots = (await c.get(f'{base}/slots')).json()
    return not any(s.get('is_processing') for s in slots)
