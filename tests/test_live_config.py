"""Configuration that applies itself, against real llama-servers (two fixture models, both running): a saved change
restarts exactly the running models whose launch it changes, after their requests drain; the others keep their
process; supervisor-only fields apply at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import wait_for
from tests.serving import Served, serve
from tests.supervisor_helpers import direct

A, B = 'tiny-llama', 'tiny-llama-b'


@pytest.fixture
async def served(system_factory: Any, models_dir: Path, tiny_model: Path, tiny_model_b: Path) -> Any:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, max_loaded_models=0)
    async with serve(system) as s:
        async with s.client() as c:
            for model in (A, B):
                assert (await c.post(f'/api/models/{model}/load')).status_code == 200
        yield s


def pid(s: Served, model: str) -> int:
    return int(s.system.scheduler.describe(model)['pid'])


async def n_ctx(s: Served, model: str) -> int:
    async with direct(s.upstream(model)) as own:
        return int((await own.get('/props')).json()['default_generation_settings']['n_ctx'])


async def test_a_changed_launch_restarts_that_model_only_after_its_stream(served: Served) -> None:
    pids = {m: pid(served, m) for m in (A, B)}
    ctx_before = await n_ctx(served, A)
    events = served.system.bus.queue(['models'])
    body = {'model': A, 'prompt': 'hi', 'max_tokens': 200, 'ignore_eos': True, 'stream': True}
    async with served.client() as c, c.stream('POST', '/v1/completions', json=body) as stream:
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith('data: ')  # generating
        r = await c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1024})
        assert r.status_code == 200, r.text
        assert r.json()['applied']['restarting'] == [A] and B in r.json()['applied']['unchanged']
        rest = [line async for line in lines]  # the stream in flight finishes on the old server
    assert 'data: [DONE]' in rest and not any('"error"' in line for line in rest)
    await wait_for(lambda: served.system.scheduler.describe(A)['status'] == 'ready' and pid(served, A) != pids[A], 30)
    assert await n_ctx(served, A) != ctx_before
    assert pid(served, B) == pids[B]  # untouched
    restart = None
    while restart is None:
        event = await asyncio.wait_for(events.get(), 5)
        restart = event.data if event.type == 'restart' else None
    assert restart['model'] == A and '--ctx-size (unset) -> 1024' in restart['reason']


async def test_ttl_and_pin_apply_without_a_restart(served: Served) -> None:
    before = pid(served, A)
    async with served.client() as c:
        r = await c.put(f'/api/models/{A}/parameters', json={'ttl': 1, 'pinned': True})
        assert r.status_code == 200, r.text
    assert r.json()['applied']['restarting'] == [] and A in r.json()['applied']['unchanged']
    assert pid(served, A) == before
    # The new ttl is in force on the running server: idle, it is unloaded within a few seconds.
    await wait_for(lambda: served.system.scheduler.describe(A)['status'] == 'stopped', 15)


async def test_a_default_restarts_the_models_that_inherit_it(served: Served) -> None:
    async with served.client() as c:
        r = await c.put(f'/api/models/{B}/parameters', json={'threads': 1})  # B overrides threads
        assert r.json()['applied']['restarting'] == [B]
        await wait_for(lambda: served.system.scheduler.describe(B)['status'] == 'ready', 30)
        await wait_for(lambda: not served.system.scheduler._restarts, 30)
        pids = {m: pid(served, m) for m in (A, B)}
        r = await c.put('/api/parameters', json={'threads': 2})
        assert r.status_code == 200, r.text
        assert r.json()['applied']['restarting'] == [A] and r.json()['applied']['unchanged'] == [B]
    await wait_for(lambda: served.system.scheduler.describe(A)['status'] == 'ready' and pid(served, A) != pids[A], 30)
    assert pid(served, B) == pids[B]
    assert ' --threads 2 ' in ' '.join(psutil.Process(pid(served, A)).cmdline()) + ' '
    assert ' --threads 1 ' in ' '.join(psutil.Process(pid(served, B)).cmdline()) + ' '


async def test_a_change_that_touches_no_launch_restarts_nothing(served: Served) -> None:
    pids = {m: pid(served, m) for m in (A, B)}
    async with served.client() as c:
        r = await c.put('/api/config', json={'sse_heartbeat': 20, 'concurrency_limit': 3})
        assert r.status_code == 200, r.text
    applied = r.json()['applied']
    assert applied['restarting'] == [] and sorted(applied['unchanged']) == [A, B]
    assert {m: pid(served, m) for m in (A, B)} == pids
    assert json.dumps(applied)


async def test_requests_during_a_restart_wait_for_the_new_server(served: Served) -> None:
    old, ctx_before = pid(served, A), await n_ctx(served, A)
    async with served.client() as c:
        r = await c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1024})
        assert r.json()['applied']['restarting'] == [A]
        # Asked the moment the save returns: the new server answers.
        props = (await c.get(f'/upstream/{A}/props')).json()
        assert props['default_generation_settings']['n_ctx'] != ctx_before
        # Sent while A is being swapped: answered by the new server, not refused.
        answers = await asyncio.gather(
            *(c.post('/v1/completions', json={'model': A, 'prompt': 'hi', 'max_tokens': 2}) for _ in range(3))
        )
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert pid(served, A) != old and await n_ctx(served, A) != ctx_before


# ---- the config file, edited by hand ------------------------------------------------------------------------------
@pytest.fixture
async def on_file(system_factory: Any, models_dir: Path, tiny_model: Path, tmp_path: Path) -> Any:
    """A System whose settings come from its config file (nothing on the command line that would win over it)."""
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({'models_dirs': [str(models_dir)], 'scan_well_known_dirs': False}))
    system = await system_factory()
    async with serve(system) as s:
        yield s, config


async def test_a_valid_edit_of_the_file_applies_itself(on_file: Any) -> None:
    served, config = on_file
    events = served.system.bus.queue(['config'])
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, 'concurrency_limit': 3, 'sse_heartbeat': 7}))
    await wait_for(lambda: served.system.config.settings.concurrency_limit == 3, 5)
    async with served.client() as c:
        described = (await c.get('/api/config')).json()
    assert described['settings']['sse_heartbeat'] == 7 and described['sources']['concurrency_limit'] == 'file'
    assert described['file_errors'] == []
    event = await asyncio.wait_for(events.get(), 5)
    assert event.type == 'changed' and 'concurrency_limit' in event.data['changed']


@pytest.mark.parametrize(
    'text, field',
    [('{"concurrency_limit": 3,', '(file)'), ('{"concurrency_limit": -1}', 'concurrency_limit'), ('[1]', '(file)')],
)
async def test_an_invalid_edit_keeps_the_config_in_force(on_file: Any, models_dir: Path, text: str, field: str) -> None:
    served, config = on_file
    before = served.system.config.settings
    events = served.system.bus.queue(['config'])
    config.write_text(text)
    event = await asyncio.wait_for(events.get(), 5)
    assert event.type == 'invalid' and event.data['file'] == str(config)
    assert [e['field'] for e in event.data['errors']] == [field]
    assert served.system.config.settings == before  # nothing of the bad edit is in force
    async with served.client() as c:
        described = (await c.get('/api/config')).json()
    assert [e['field'] for e in described['file_errors']] == [field]
    assert config.read_text() == text  # the user's file is left as it is
    # Fixing the file applies it and clears the error.
    fixed = {'models_dirs': [str(models_dir)], 'scan_well_known_dirs': False, 'concurrency_limit': 4}
    config.write_text(json.dumps(fixed))
    await wait_for(lambda: served.system.config.settings.concurrency_limit == 4, 5)
    assert served.system.config.file_errors == []


async def test_models_dirs_change_live(on_file: Any, tmp_path: Path, models_dir: Path) -> None:
    from tests.gguf_factory import write_tiny_gguf

    served, _ = on_file
    other = tmp_path / 'other-models'
    other.mkdir()
    write_tiny_gguf(other / 'other-llama.gguf', name='other-llama', seed=7)
    assert served.system.library.get('other-llama') is None and served.system.library.get(A) is not None
    async with served.client() as c:
        r = await c.put('/api/config', json={'models_dirs': [str(other)]})
        assert r.status_code == 200, r.text
    await wait_for(lambda: served.system.library.get('other-llama') is not None, 10)
    await wait_for(lambda: served.system.library.get(A) is None, 10)


# ---- import / export ----------------------------------------------------------------------------------------------
async def test_import_dry_run_shows_the_plan_and_import_applies_it(served: Served) -> None:
    pids = {m: pid(served, m) for m in (A, B)}
    async with served.client() as c:
        exported = (await c.get('/api/config/export')).json()
        wanted = {**exported, 'models': {A: {'ctx_size': 1024}}, 'concurrency_limit': 5}
        r = await c.post('/api/config/import', params={'dry_run': 'true'}, json=wanted)
        assert r.status_code == 200, r.text
        dry = r.json()
        assert dry['plan']['restarting'] == [A] and dry['plan']['unchanged'] == [B]
        assert dry['diff']['concurrency_limit'] == {'from': 10, 'to': 5} and 'models' in dry['diff']
        assert (await c.get('/api/config/export')).json() == exported  # nothing saved
        assert {m: pid(served, m) for m in (A, B)} == pids  # nothing restarted
        r = await c.post('/api/config/import', json=wanted)
        assert r.status_code == 200, r.text
        assert r.json()['applied']['restarting'] == [A]
        assert (await c.get('/api/config/export')).json()['concurrency_limit'] == 5
        bad = await c.post('/api/config/import', json={**wanted, 'concurrency_limit': 'many'})
        assert bad.status_code == 422 and bad.json()['detail'][0]['field'] == 'concurrency_limit'
    await wait_for(lambda: served.system.scheduler.describe(A)['status'] == 'ready' and pid(served, A) != pids[A], 30)
    assert pid(served, B) == pids[B] and served.system.config.settings.concurrency_limit == 5


async def test_export_redacts_keys_unless_asked_with_one(make_served: Any, tmp_path: Path) -> None:
    key = 'k-' + 'x' * 30
    async with await make_served(api_keys=[key]) as s, s.client(headers={'Authorization': f'Bearer {key}'}) as c:
        # The keys given on the command line are not in the file: save one to it first.
        assert (await c.put('/api/config', json={'api_keys': [key]})).status_code == 200
        assert (await c.get('/api/config/export')).json()['api_keys'] == ['***']
        assert (await c.get('/api/config/export', params={'secrets': 'true'})).json()['api_keys'] == [key]
        # A redacted export imported again keeps the saved keys.
        exported = (await c.get('/api/config/export')).json()
        assert (await c.post('/api/config/import', json=exported)).status_code == 200
        assert s.system.config.file_data(secrets=True)['api_keys'] == [key]


# ---- per-model aliases and preload ----------------------------------------------------------------------------
async def test_aliases_and_preload_per_model_apply_at_once(served: Served) -> None:
    before = pid(served, A)
    async with served.client() as c:
        assert (await c.post(f'/api/models/{B}/unload')).status_code == 200
        r = await c.put(f'/api/models/{A}/parameters', json={'aliases': ['house-model', 'Gossip']})
        assert r.status_code == 200, r.text
        assert r.json()['applied']['restarting'] == []  # a name is no launch flag
        answer = await c.post('/v1/completions', json={'model': 'house-model', 'prompt': 'hi', 'max_tokens': 2})
        assert answer.status_code == 200 and answer.json()['model'] in (A, 'house-model')
        assert (await c.post('/v1/completions', json={'model': 'gossip', 'prompt': 'hi', 'max_tokens': 1})).is_success
        assert pid(served, A) == before
        # preload: set for the stopped B, it starts now.
        r = await c.put(f'/api/models/{B}/parameters', json={'preload': True})
        assert r.json()['applied'].get('starting') == [B]
    await wait_for(lambda: served.system.scheduler.describe(B)['status'] == 'ready', 30)
    # Unloaded again by the user, it stays unloaded when something else changes.
    async with served.client() as c:
        assert (await c.post(f'/api/models/{B}/unload')).status_code == 200
        r = await c.put('/api/config', json={'concurrency_limit': 6})
        assert 'starting' not in r.json()['applied']
    assert served.system.scheduler.describe(B)['status'] == 'stopped'


async def test_a_model_flagged_preload_starts_with_the_app(
    system_factory: Any, models_dir: Path, tiny_model: Path, tiny_model_b: Path
) -> None:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, models={B: {'preload': True}})
    await wait_for(lambda: system.scheduler.describe(B)['status'] == 'ready', 30)
    assert system.scheduler.describe(A)['status'] == 'stopped'


async def test_a_lease_taken_as_the_change_is_applied_gets_the_new_server(served: Served) -> None:
    system, old = served.system, pid(served, A)
    await asyncio.to_thread(system.config.update, {'models': {A: {'ctx_size': 1024}}})
    assert (await system.apply_config())['restarting'] == [A]
    async with system.scheduler.lease(A) as up:  # in the same turn of the loop as the restart was scheduled
        assert up.pid != old


async def test_next_start_and_the_server_limits_apply_live(make_served: Any) -> None:
    import socket
    import time

    async with await make_served() as s, s.client() as c:
        r = await c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1024})  # A is not running
        assert r.json()['applied']['next_start'] == [A] and r.json()['applied']['restarting'] == []
        # A connection limit no longer needs an app restart: the next connection is judged by the new one.
        r = await c.put('/api/config', json={'client_timeout': 0.5})
        assert r.status_code == 200 and r.json()['restart_required'] == []
        port = int(s.base_url.rsplit(':', 1)[1])

        def stalled_is_closed() -> bool:
            with socket.create_connection(('127.0.0.1', port), timeout=5) as sock:
                sock.sendall(b'GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ')
                t0 = time.monotonic()
                try:
                    return sock.recv(1) == b'' and time.monotonic() - t0 < 4
                except ConnectionResetError:
                    return True

        assert await asyncio.to_thread(stalled_is_closed)


# ---- races a user can cause -----------------------------------------------------------------------------------
def running_ctx(s: Served, model: str) -> str | None:
    argv = psutil.Process(pid(s, model)).cmdline()
    return argv[argv.index('--ctx-size') + 1] if '--ctx-size' in argv else None


async def settled(s: Served, model: str) -> None:
    sched = s.system.scheduler
    await wait_for(lambda: not sched._restarts and sched.describe(model)['status'] == 'ready', 30)


async def test_two_saves_at_once_restart_once_and_the_last_wins(served: Served) -> None:
    events = served.system.bus.queue(['models'])
    async with served.client() as c:
        await asyncio.gather(
            c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1024}),
            c.put(f'/api/models/{B}/parameters', json={'ctx_size': 1536}),
        )
    await settled(served, A)
    await settled(served, B)
    # Both saves are kept (each model's parameters read and written under one lock), and each model runs its own.
    saved = served.system.config.file_data()['models']
    assert saved[A]['ctx_size'] == 1024 and saved[B]['ctx_size'] == 1536
    assert running_ctx(served, A) == '1024' and running_ctx(served, B) == '1536'
    restarts = []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), 0.3)
        except TimeoutError:
            break
        restarts += [event.data['model']] if event.type == 'restart' else []
    assert sorted(restarts) == [A, B]


async def test_a_save_during_a_restart_is_not_lost(served: Served) -> None:
    sched = served.system.scheduler
    async with served.client() as c:
        assert (await c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1024})).json()['applied']['restarting']
        await wait_for(lambda: sched.describe(A)['status'] == 'starting', 10, interval=0.001)
        r = await c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1536})
        assert r.json()['applied']['restarting'] == [A]
    await settled(served, A)
    assert running_ctx(served, A) == '1536'


async def test_an_unload_during_a_restart_is_kept(served: Served) -> None:
    sched = served.system.scheduler
    body = {'model': A, 'prompt': 'hi', 'max_tokens': 300, 'ignore_eos': True, 'stream': True}
    async with served.client() as c, c.stream('POST', '/v1/completions', json=body) as stream:
        lines = stream.aiter_lines()
        await anext(lines)  # in flight: the restart drains it first
        assert (await c.put(f'/api/models/{A}/parameters', json={'ctx_size': 1024})).json()['applied']['restarting']
        assert (await c.post(f'/api/models/{A}/unload')).status_code == 200
        async for _ in lines:
            pass
    await wait_for(lambda: not sched._restarts, 30)
    assert sched.describe(A)['status'] == 'stopped'


async def test_stopping_the_app_during_a_restart_leaves_no_server(system_factory: Any, models_dir: Path) -> None:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, drain_timeout=3)
    await system.scheduler.load(A)
    lease = system.scheduler.lease(A)
    await lease.__aenter__()  # in flight across the stop
    await asyncio.to_thread(system.config.update, {'models': {A: {'ctx_size': 1024}}})
    assert (await system.apply_config())['restarting'] == [A]
    await system.stop()
    await lease.__aexit__(None, None, None)
    assert system.scheduler.describe(A)['status'] == 'stopped'
    children = [p for p in psutil.Process().children(recursive=True) if 'llama-server' in ' '.join(p.cmdline())]
    assert children == []


# ---- what an edit or an import must not do ------------------------------------------------------------------------
async def test_deleting_the_file_keeps_the_settings(on_file: Any) -> None:
    served, config = on_file
    before = served.system.config.settings
    events = served.system.bus.queue(['config'])
    config.unlink()
    event = await asyncio.wait_for(events.get(), 5)
    assert event.type == 'invalid' and 'gone' in event.data['errors'][0]['message']
    assert served.system.config.settings == before


async def test_an_exported_placeholder_never_becomes_a_key(on_file: Any) -> None:
    served, _ = on_file
    key, new = 'k-' + 'a' * 30, 'k-' + 'b' * 30
    auth = {'Authorization': f'Bearer {key}'}
    async with served.client(headers=auth) as c:
        assert (await c.put('/api/config', json={'api_keys': [key]})).status_code == 200
        exported = (await c.get('/api/config/export')).json()
        assert exported['api_keys'] == ['***']
        r = await c.post('/api/config/import', json={**exported, 'api_keys': [*exported['api_keys'], new]})
        assert r.status_code == 200, r.text
        assert served.system.config.file_data(secrets=True)['api_keys'] == [key, new]
        assert (await c.put('/api/config', json={'api_keys': ['***']})).status_code == 422
    async with served.client(headers={'Authorization': 'Bearer ***'}) as c:
        assert (await c.get('/api/config')).status_code == 401


async def test_an_alias_that_names_another_model_is_refused(served: Served) -> None:
    async with served.client() as c:
        r = await c.put(f'/api/models/{A}/parameters', json={'aliases': [B]})
        assert (
            r.status_code == 422
            and r.json()['detail'][0]['field'] == 'aliases'
            and B in r.json()['detail'][0]['message']
        )
        assert served.system.library.get(B).id == B
