"""The Nodes page through NiceGUI's simulated user: a node (a second System over HTTP, in this process) and an
OpenAI server (scripted) as remotes; their states and models are shown live, and a node's model loads and
unloads from the page."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nicegui.testing import User

from tests.conftest import wait_for
from tests.fake_openai import FakeOpenAI

KEY = 'node-key'


@pytest.fixture
async def remotes_env(
    make_served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Any, FakeOpenAI]]:
    fake = await FakeOpenAI().start()
    async with await make_served(api_keys=[KEY]) as node:
        empty = tmp_path / 'none'
        empty.mkdir()
        remotes = [
            {'name': 'gpu-box', 'url': node.base_url, 'kind': 'node', 'api_key': KEY, 'check_interval': 0.3},
            {'name': 'cloud', 'url': fake.url, 'api_key': fake.key, 'prefix': 'cloud', 'check_interval': 0.3},
        ]
        monkeypatch.setenv('LAP_REMOTES', json.dumps(remotes))
        monkeypatch.setenv('LAP_MODELS_DIRS', str(empty))
        yield node, fake
    await fake.stop()


async def test_nodes_page_shows_remotes_live_and_loads_a_nodes_model(
    remotes_env: tuple[Any, FakeOpenAI], user: User
) -> None:
    node, fake = remotes_env
    await user.open('/nodes')
    await user.should_see('gpu-box')
    await user.should_see('up', marker='node-state-gpu-box', retries=50)
    await wait_for(lambda: 'tiny-llama' in ids(user, 'node-models-gpu-box'))
    await wait_for(lambda: 'cloud/gpt-fake' in ids(user, 'node-models-cloud'))
    await user.should_see('RAM', marker='node-figures-gpu-box')
    assert KEY not in json.dumps(next(iter(user.find(marker='node-gpu-box').elements)).props)

    table = user.find(marker='node-models-gpu-box')
    row = next(r for r in next(iter(table.elements)).rows if r['id'] == 'tiny-llama')
    assert row['can_load'] and not row['can_unload']
    table.trigger('load', row)  # what the row's Load button emits
    await user.should_see('tiny-llama loaded on gpu-box', retries=100)
    await wait_for(lambda: node.system.scheduler.describe('tiny-llama').get('status') == 'ready')
    await wait_for(lambda: ids(user, 'node-models-gpu-box').get('tiny-llama') == 'ready')
    row = next(r for r in next(iter(user.find(marker='node-models-gpu-box').elements)).rows if r['id'] == 'tiny-llama')
    assert row['can_unload']
    user.find(marker='node-models-gpu-box').trigger('unload', row)
    await user.should_see('tiny-llama unloaded on gpu-box', retries=100)
    assert node.system.scheduler.describe('tiny-llama').get('status') == 'stopped'

    # The Models page lists them too, with the machine as a column and a filter.
    await user.open('/models')
    await user.should_see('On other machines')
    rows = await wait_for(lambda: _remote_rows(user) if len(_remote_rows(user)) >= 4 else None)
    assert ('tiny-llama', 'gpu-box') in rows and ('cloud/gpt-fake', 'cloud') in rows
    user.find(marker='remote-models-machine').elements.copy().pop().set_value('cloud')
    assert {node for _, node in _remote_rows(user)} == {'cloud'}

    await user.open('/nodes')
    await fake.stop()
    await user.should_see('down', marker='node-state-cloud', retries=100)
    await user.should_see('cannot connect', marker='node-error-cloud', retries=20)


def _remote_rows(user: User) -> list[tuple[str, str]]:
    found = user.find(marker='remote-models-table').elements
    return [(r['id'], r['node']) for r in next(iter(found)).rows] if found else []


def ids(user: User, marker: str) -> dict[str, str]:
    """A node card's models table: model id -> its state there."""
    found = user.find(marker=marker).elements
    return {r['id']: r['status'] for r in next(iter(found)).rows} if found else {}


@pytest.fixture
def rpc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    from tests.conftest import free_port

    port = free_port()
    empty = tmp_path / 'none'
    empty.mkdir()
    monkeypatch.setenv('LAP_RPC_SERVER', json.dumps({'port': port, 'threads': 1}))
    monkeypatch.setenv('LAP_MODELS_DIRS', str(empty))
    return port


async def test_the_rpc_worker_starts_and_stops_from_the_nodes_page(rpc_env: int, user: User) -> None:
    await user.open('/nodes')
    await user.should_see('No other machines configured')
    await user.should_see('stopped', marker='rpc-state')
    await user.should_see(f'127.0.0.1:{rpc_env}')
    user.find(marker='rpc-start').click()
    await user.should_see(f'RPC worker ready on 127.0.0.1:{rpc_env}', retries=100)
    await user.should_see('ready', marker='rpc-state', retries=20)
    await user.should_see('free of', marker='rpc-devices', retries=20)  # the devices it lends, with their memory
    user.find(marker='rpc-stop').click()
    await user.should_see(f'RPC worker stopped on 127.0.0.1:{rpc_env}', retries=100)
    await user.should_see('stopped', marker='rpc-state', retries=20)
