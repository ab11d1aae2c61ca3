"""Nodes (issue 17, part 2): two instances of the app, each through its real CLI with its own data dir and
models; the front lists the node's models, serves them through it, loads and unloads them there, places a model
where it fits, fails fast while the node is down and uses it again once it is back, and never forwards in a loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AppProcess, free_port, poll, start_app, stop_process

NODE_KEY = 'node-b-admin-key'
FRONT_KEY = 'front-a-admin-key'
HI = [{'role': 'user', 'content': 'hi'}]
# The tiny model's KV cache at this context is far more than any machine's memory: "does not fit" there.
HUGE_CTX = 2_000_000_000


def models_dir(root: Path, tiny: Path, *names: str) -> Path:
    d = root / 'models'
    d.mkdir(parents=True)
    for name in names:
        shutil.copy(tiny, d / f'{name}.gguf')
    return d


def node(name: str, url: str, key: str) -> dict[str, Any]:
    return {'name': name, 'url': url, 'kind': 'node', 'api_key': key, 'check_interval': 0.5}


def start(tmp: Path, models: Path, key: str, config: dict[str, Any], port: int | None = None) -> AppProcess:
    (tmp / 'app-config.json').write_text(json.dumps({'api_keys': [key], **config}))
    return start_app(tmp, '--models-dir', str(models), port=port)


def api(app: AppProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=app.base_url, headers={'Authorization': f'Bearer {key}'}, timeout=60)


def chat(c: httpx.Client, model: str, **headers: str) -> httpx.Response:
    return c.post('/v1/chat/completions', json={'model': model, 'messages': HI, 'max_tokens': 4}, headers=headers)


def rows(c: httpx.Client, model: str) -> list[dict[str, Any]]:
    return c.get('/api/requests', params={'model': model}).json()['requests']


def node_state(c: httpx.Client, name: str) -> dict[str, Any]:
    return c.get(f'/api/nodes/{name}').json()


def model_there(c: httpx.Client, name: str, model: str) -> dict[str, Any] | None:
    return next((m for m in node_state(c, name)['models'] if m['id'] == model), None)


@pytest.fixture
def pair(tmp_path: Path, tiny_model: Path) -> Iterator[dict[str, Any]]:
    """Node B (models: only-on-b, shared) and front A (models: only-on-a, shared), A listing B as a node and B
    listing A. On A, `shared` is configured with a context no machine holds: it fits on B only."""
    port_a, port_b = free_port(), free_port()
    dir_a = models_dir(tmp_path / 'a', tiny_model, 'only-on-a', 'shared')
    dir_b = models_dir(tmp_path / 'b', tiny_model, 'only-on-b', 'shared')
    url_a, url_b = f'http://127.0.0.1:{port_a}', f'http://127.0.0.1:{port_b}'
    b_config = {'remotes': [node('a', url_a, FRONT_KEY)]}
    b = start(tmp_path / 'b', dir_b, NODE_KEY, b_config, port=port_b)
    a_config = {'remotes': [node('b', url_b, NODE_KEY)], 'models': {'shared': {'ctx_size': HUGE_CTX}}}
    a = start(tmp_path / 'a', dir_a, FRONT_KEY, a_config, port=port_a)
    apps = {'a': a, 'b': b, 'dir_b': dir_b, 'b_config': b_config, 'port_b': port_b, 'tmp': tmp_path}
    yield apps
    for app in (apps['a'], apps['b']):
        stop_process(app.proc, timeout=20)


def test_the_front_serves_lists_and_controls_a_nodes_models(pair: dict[str, Any]) -> None:
    with api(pair['a'], FRONT_KEY) as a, api(pair['b'], NODE_KEY) as b:
        poll(lambda: model_there(a, 'b', 'only-on-b'), 20, 'node b listed on the front')
        listed = {m['id']: m for m in a.get('/v1/models').json()['data']}
        assert listed['only-on-b']['owned_by'] == 'b'
        assert listed['only-on-a']['owned_by'] == 'llama-async-proxy'
        state = node_state(a, 'b')
        assert state['state'] == 'up' and state['kind'] == 'node'
        assert state['monitoring']['ram_total_bytes'] > 0  # the node's own memory figures
        assert NODE_KEY not in json.dumps(state)

        r = chat(a, 'only-on-b')
        assert r.status_code == 200, r.text
        assert r.json()['usage']['completion_tokens'] >= 1
        front_row = poll(lambda: rows(a, 'only-on-b'), 10, 'the front recorded it')[0]
        assert front_row['upstream'] == 'b' and front_row['status'] == 200
        node_row = poll(lambda: rows(b, 'only-on-b'), 10, 'the node recorded it')[0]
        assert node_row['upstream'] is None  # served by B's own llama-server, not passed on again
        assert a.get('/api/models').json()['models'][0]['status'] == 'stopped'  # nothing started on the front
        poll(lambda: (model_there(a, 'b', 'only-on-b') or {}).get('status') == 'ready', 10, 'ready on b, seen on a')

        r = a.post('/api/nodes/b/models/only-on-b/unload')
        assert r.status_code == 200, r.text
        b_models = {m['id']: m for m in b.get('/api/models').json()['models']}
        assert b_models['only-on-b']['status'] == 'stopped'
        poll(lambda: model_there(a, 'b', 'only-on-b')['status'] == 'stopped', 10, 'stopped on b, seen on a')
        r = a.post('/api/nodes/b/models/only-on-b/load')
        assert r.status_code == 200 and r.json()['status'] == 'ready'
        assert a.post('/api/nodes/b/models/no-such-model/load').status_code == 404  # B's own answer
        assert a.post('/api/nodes/nowhere/models/x/load').status_code == 404
        for sneaky in ('..%2F..%2Fmodels%2Funload', 'x%2F..', '.'):  # only a model's own path on the node
            assert a.post(f'/api/nodes/b/models/{sneaky}/load').status_code == 404
        assert b.get('/api/models').json()['models'][0]['status'] in ('ready', 'stopped')


def test_placement_sends_a_model_to_the_node_where_it_fits(pair: dict[str, Any]) -> None:
    with api(pair['a'], FRONT_KEY) as a, api(pair['b'], NODE_KEY) as b:
        poll(lambda: model_there(a, 'b', 'shared'), 20, 'node b listed on the front')
        front_fit = next(m for m in a.get('/api/models').json()['models'] if m['id'] == 'shared')['fit']
        assert front_fit['label'] == 'does not fit'
        assert model_there(a, 'b', 'shared')['fit'] == 'fits'
        for _ in range(3):
            assert chat(a, 'shared').status_code == 200
        assert {r['upstream'] for r in poll(lambda: rows(a, 'shared')[2:] and rows(a, 'shared'), 10)} == {'b'}
        assert len(poll(lambda: len(rows(b, 'shared')) == 3 and rows(b, 'shared'), 10)) == 3
        statuses = {m['id']: m['status'] for m in a.get('/api/models').json()['models']}
        assert statuses['shared'] == 'stopped'  # never loaded where it does not fit


def test_no_forwarding_loop_when_each_lists_the_other(pair: dict[str, Any]) -> None:
    with api(pair['a'], FRONT_KEY) as a, api(pair['b'], NODE_KEY) as b:
        poll(lambda: model_there(a, 'b', 'only-on-b') and model_there(b, 'a', 'only-on-a'), 20, 'each lists the other')
        assert 'only-on-a' not in {m['id'] for m in node_state(a, 'b')['models']}  # B lists its own models only
        t0 = time.monotonic()
        r = chat(a, 'nowhere')
        assert r.status_code == 404 and time.monotonic() - t0 < 5
        assert rows(b, 'nowhere') == []
        # What a node forwards is served from the receiver's own models or refused: never passed on again.
        r = chat(a, 'only-on-b', **{'x-lap-forwarded': '1'})
        assert r.status_code == 404
        assert rows(b, 'only-on-b') == []
        assert chat(b, 'only-on-a').status_code == 200  # B -> A, served by A itself
        assert poll(lambda: rows(a, 'only-on-a'), 10)[0]['upstream'] is None


def test_a_node_killed_fails_fast_and_is_used_again_when_back(pair: dict[str, Any]) -> None:
    with api(pair['a'], FRONT_KEY) as a:
        poll(lambda: model_there(a, 'b', 'only-on-b'), 20, 'node b listed on the front')
        r = chat(a, 'only-on-b')
        assert r.status_code == 200, r.text
        os.killpg(pair['b'].proc.pid, signal.SIGKILL)  # the app and its llama-servers, at once
        pair['b'].proc.wait(10)
        t0 = time.monotonic()
        r = chat(a, 'only-on-b')
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        assert 'b' in r.json()['error']['message']
        poll(lambda: node_state(a, 'b')['state'] == 'down', 10, 'b marked down')
        listed = {m['id']: m for m in a.get('/v1/models').json()['data']}
        assert listed['only-on-b']['status'] == 'down'
        t0 = time.monotonic()
        r = chat(a, 'only-on-b')  # known down: refused at once
        assert r.status_code == 503 and time.monotonic() - t0 < 1
        assert chat(a, 'only-on-a').status_code == 200  # the front's own models are not affected

        b_tmp = pair['tmp'] / 'b'
        pair['b'] = start(b_tmp, pair['dir_b'], NODE_KEY, pair['b_config'], port=pair['port_b'])
        poll(lambda: node_state(a, 'b')['state'] == 'up', 20, 'b up again')
        r = chat(a, 'only-on-b')
        assert r.status_code == 200, r.text
