"""One llama-server process and its state machine.

    stopped -> starting -> ready -> stopping -> stopped
                  |          |
                  v          v (crash / hung)
              restarting (backoff) -> starting ... -> failed (after too many failures; terminal until loaded again)

A single task (`_run`) owns the process from spawn to exit, so a start, a crash restart and a stop never race on
a stale state read. Callers wait on `wait_ready()`; `stop()` cancels that task and reaps the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import random
import re
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from core.supervisor.errors import StartFailed, Unloaded
from core.supervisor.states import ACTIVE_STATES, ModelState

log = logging.getLogger(__name__)

HOST = '127.0.0.1'
LOG_TAIL_LINES = 40
READ_CHUNK = 64 * 1024
# A longer line is cut there (the rest is read and dropped): a child flooding one endless line costs a bounded
# buffer, and the log ring (10 000 lines) at most ~160 MiB even if every line were that long.
MAX_LINE = 16 * 1024
CUT_NOTE = b' [... line cut at 16 KiB]'
# After each read of a server's output, wait this long so that its lines are handled together: llama-server writes
# ~9 lines per chat request, one write each, and handling each on its own cost the proxy ~1/3 of its CPU per request.
# The output is still read as it comes (strace: ~3 reads per chat request), into the StreamReader's buffer. Pausing
# that transport too was tried: direct embeddings/s at c=4 fell by half with the CPUs half idle (uvloop's pipes are
# socketpairs, whose small send buffer filled in 20 ms and held llama-server up), so it is not done.
READ_PAUSE_S = 0.02
HEALTH_POLL_S = 0.02  # while starting: llama-server is healthy ~20 ms after spawn on small models
LIVENESS_FAILURES = 3  # consecutive failed liveness checks before a ready server counts as hung
BIND_RETRIES = 5
TERM_RESEND_S = 1.0
LOADING_STOP_S = 2.0  # how long a stop waits for a server that is still loading before it kills it
EXIT_HANG_S = 1.0  # after llama-server says "terminating immediately" (see ServerProcess._signal_until_exit)
_EXIT_NOW = 'terminating immediately'  # llama-server's answer to a second SIGTERM

# Load progress from llama-server's log: (marker, progress). It prints no percentage, only these stages.
_PROGRESS_MARKERS = (
    ('loading model', 0.1),
    ('llama_model_loader: loaded meta data', 0.2),
    ('load_tensors', 0.4),
    ('llama_context', 0.6),
    ('load_model: initializing', 0.8),
    ('model loaded', 0.95),
)
_BIND_ERRORS = ('address already in use', "couldn't bind", 'could not bind', 'failed to bind')

AUTO_SLOTS = 4  # what llama-server's -np auto gives in this build (it serves max(-np + 2, cores - 1) connections)


@dataclass(frozen=True)
class Upstream:
    model_id: str
    host: str
    port: int
    base_url: str
    pid: int
    api_key: str | None = None  # the server's own key: only the proxy and the sampler send it
    headers: tuple[tuple[bytes, bytes], ...] = ()  # added to every proxied request (the key, as a header)
    slots: int = AUTO_SLOTS  # its -np: the proxy keeps no more idle connections than this (see UpstreamClient)
    tls: ssl.SSLContext | None = None  # a remote upstream over HTTPS (core/remotes)
    connect_timeout: float | None = None  # a remote's own; None: the pool's
    response_timeout: float | None = None  # a remote's: seconds to the start of its answer; None: no limit


@dataclass(frozen=True)
class Timings:
    load_timeout: float = 300.0
    stop_timeout: float = 10.0
    health_interval: float = 5.0
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    max_failures: int = 5
    failure_window: float = 300.0
    healthy_reset: float = 60.0

    def backoff(self, failures: int) -> float:
        """1, 2, 4 ... x base, capped, with up to 10% jitter so restarts of several models do not align."""
        delay = min(self.restart_backoff * 2 ** max(failures - 1, 0), self.restart_backoff_max)
        return delay * (1 + 0.1 * random.random())


@dataclass(frozen=True)
class Launch:
    """Everything needed to spawn: `argv(port)` builds the command line for a free port."""

    argv: Callable[[int], list[str]]
    env: dict[str, str]
    timings: Timings
    api_key: str | None = None  # what the server was told to require (in a file or its environment)


class _Exited(Exception):
    def __init__(self, message: str, bind_race: bool = False) -> None:
        super().__init__(message)
        self.bind_race = bind_race


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the child when this process dies (Linux only)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ServerProcess:
    def __init__(
        self,
        model_id: str,
        logs: Any,
        publish: Callable[[dict[str, Any]], None],
        registry: Any = None,
    ) -> None:
        self.model_id = model_id
        self.logs = logs
        self._publish = publish
        self.registry = registry
        self.state: ModelState = ModelState.STOPPED
        self.pid: int | None = None
        self.port: int | None = None
        self._upstream: Upstream | None = None
        self._api_key: str | None = None
        self.progress: float | None = None
        self.error: str | None = None
        self.restarts = 0
        self.ready_since: float | None = None
        self.inflight = 0
        self.waiters = 0
        self.last_used = time.monotonic()
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.keep_alive_s: float | None = None  # idle seconds before unloading, for this load (Scheduler.keep_alive)
        self._exit_now_at: float | None = None  # when it said it exits at once (a second SIGTERM)
        self.launch_info: Any = None  # what the scheduler launched it with (params, memory need)
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[Upstream] | None = None

    # ---- reading -------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.inflight + self.waiters > 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def upstream(self) -> Upstream:
        assert self.port is not None and self.pid is not None
        up = self._upstream
        if up is None or up.port != self.port or up.pid != self.pid:  # asked for on every request: built once
            key = self._api_key
            headers = ((b'authorization', b'Bearer ' + key.encode()),) if key else ()
            base_url = f'http://{HOST}:{self.port}'
            params = self.launch_info.params if self.launch_info is not None else None
            slots = _slots(params)
            up = self._upstream = Upstream(self.model_id, HOST, self.port, base_url, self.pid, key, headers, slots)
        return up

    def describe(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.ready_since if self.state == ModelState.READY and self.ready_since else None
        return {
            'status': self.state,
            'pid': self.pid,
            'port': self.port,
            'uptime_s': None if uptime is None else round(uptime, 3),
            'restarts': self.restarts,
            'inflight': self.inflight,
            'error': self.error,
            'progress': self.progress,
            'slots': _slots(self.launch_info.params) if self.launch_info is not None else None,
        }

    def _set(self, state: ModelState, **changes: Any) -> None:
        self.state = state
        if state in (ModelState.STOPPED, ModelState.FAILED):
            self.keep_alive_s = None  # it was for that load
        for key, value in changes.items():
            setattr(self, key, value)
        data = {
            'model': self.model_id,
            'state': state,
            'pid': self.pid,
            'port': self.port,
            'progress': self.progress,
            'error': self.error,
            'log_tail': list(self.tail) if state in (ModelState.FAILED, ModelState.RESTARTING) else [],
        }
        self._publish(data)

    # ---- control -------------------------------------------------------------------------------------------
    def start(self, launch: Launch) -> None:
        """Begin starting (no-op while a run is alive). Await `wait_ready()` for the outcome."""
        if self._run_task is not None and not self._run_task.done():
            return
        self.error = None
        self.tail.clear()
        self._api_key = launch.api_key
        self._upstream = None
        self._new_ready_future()
        self._run_task = asyncio.create_task(self._run(launch), name=f'llama-server {self.model_id}')

    async def wait_ready(self) -> Upstream:
        if self.state == ModelState.READY:
            return self.upstream()
        if self._ready is None:
            raise StartFailed(self.error or f'{self.model_id} is not starting', list(self.tail), self.model_id)
        return await asyncio.shield(self._ready)

    def reset(self) -> None:
        """Leave `failed` so that the next load starts afresh."""
        if self.state == ModelState.FAILED:
            self._set(ModelState.STOPPED, error=None, restarts=0)

    async def stop(self, stop_timeout: float, *, unload: bool = False) -> None:
        """Stop the server. `unload`: a user's unload, so whoever waits for it to load is told that, not that it
        failed."""
        task, self._run_task = self._run_task, None
        loading = self.state in (ModelState.STARTING, ModelState.RESTARTING)
        if self._proc is not None and self._proc.returncode is None:
            self._set(ModelState.STOPPING)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A server still loading has no request to finish, and may ignore SIGTERM until it is up: a short grace.
        await self._terminate(min(stop_timeout, LOADING_STOP_S) if loading else stop_timeout)
        if unload:
            self._fail_waiters(f'{self.model_id} was unloaded while loading', Unloaded)
        else:
            self._fail_waiters(f'{self.model_id} was stopped')
        self._set(ModelState.STOPPED, pid=None, port=None, progress=None, ready_since=None, error=None)

    # ---- the run loop --------------------------------------------------------------------------------------
    def _new_ready_future(self) -> None:
        if self._ready is None or self._ready.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._ready.add_done_callback(_consume)

    def _fail_waiters(self, message: str, error: type[StartFailed] = StartFailed) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error(message, list(self.tail), self.model_id))

    async def _run(self, launch: Launch) -> None:
        t = launch.timings
        failures: deque[float] = deque()
        while True:
            self._new_ready_future()
            try:
                await self._start_once(launch)
            except _Exited as e:
                self._fail_waiters(str(e))
                reason = str(e)
            else:
                self._set(ModelState.READY, progress=1.0, error=None, ready_since=time.monotonic())
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(self.upstream())
                reason = await self._watch(t)
                if time.monotonic() - (self.ready_since or 0) >= t.healthy_reset:
                    failures.clear()
            await self._terminate(t.stop_timeout)
            now = time.monotonic()
            failures.append(now)
            while failures and now - failures[0] > t.failure_window:
                failures.popleft()
            if len(failures) >= t.max_failures:
                message = f'{reason} ({len(failures)} failures in {t.failure_window:.0f} s; giving up)'
                log.error('%s: %s', self.model_id, message, extra={'model': self.model_id})
                self._set(ModelState.FAILED, error=message, pid=None, port=None, progress=None, ready_since=None)
                self._fail_waiters(message)
                self._run_task = None
                return
            delay = t.backoff(len(failures))
            log.warning('%s: %s; restarting in %.2f s', self.model_id, reason, delay, extra={'model': self.model_id})
            self.restarts += 1
            self._set(ModelState.RESTARTING, error=reason, pid=None, port=None, progress=None, ready_since=None)
            self._new_ready_future()  # callers arriving during the backoff wait for the next attempt
            await asyncio.sleep(delay)  # the backoff itself; stop() cancels it

    async def _start_once(self, launch: Launch) -> None:
        for _ in range(BIND_RETRIES):
            port = free_port()
            self._set(ModelState.STARTING, port=port, pid=None, progress=0.0)
            await self._spawn(launch.argv(port), launch.env)
            try:
                await self._wait_healthy(launch.timings.load_timeout)
                return
            except _Exited as e:
                if not e.bind_race:
                    raise
                log.info('%s: port %s was taken; retrying on another', self.model_id, port)
        raise _Exited(f'could not bind a port after {BIND_RETRIES} tries')

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        log.info('starting %s: %s', self.model_id, ' '.join(argv), extra={'model': self.model_id})
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=_parent_death_signal(),
            )
        except OSError as e:
            raise _Exited(f'cannot run {argv[0]}: {e}') from e
        self._proc = proc
        self.pid = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [asyncio.create_task(self._read(s)) for s in (proc.stdout, proc.stderr)]
        if self.registry is not None:
            await asyncio.to_thread(self.registry.add, proc.pid, self.model_id)

    async def _wait_healthy(self, load_timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        url = f'http://{HOST}:{self.port}/health'
        deadline = time.monotonic() + load_timeout
        exited = asyncio.ensure_future(proc.wait())
        try:
            async with _loopback_client(httpx.Timeout(5.0, connect=1.0)) as client:
                while True:
                    if exited.done():
                        await self._drain_readers()
                        tail = _exit_reason(list(self.tail))
                        output = ' '.join(self.tail).lower()  # all of it: the reason may leave the bind line out
                        bind_race = any(b in output for b in _BIND_ERRORS)
                        raise _Exited(
                            f'llama-server exited with code {proc.returncode} while loading: {tail}', bind_race
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            return
                    if time.monotonic() > deadline:
                        raise _Exited(f'not healthy after load_timeout={load_timeout:g} s')
                    await asyncio.wait([exited], timeout=HEALTH_POLL_S)
        finally:
            exited.cancel()

    async def _watch(self, t: Timings) -> str:
        """While ready: return why it stopped being ready (exit or a hung /health)."""
        proc = self._proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        url = f'http://{HOST}:{self.port}/health'
        misses = 0
        try:
            # A check may take as long as the interval (within reason) before it counts as a miss.
            async with _loopback_client(min(max(t.health_interval, 1.0), 10.0)) as client:
                while True:
                    done, _ = await asyncio.wait([exited], timeout=t.health_interval)
                    if done:
                        await self._drain_readers()
                        return f'llama-server exited with code {proc.returncode}'
                    try:
                        ok = (await client.get(url)).status_code < 500
                    except httpx.HTTPError:
                        ok = False
                    misses = 0 if ok else misses + 1
                    if misses >= LIVENESS_FAILURES:
                        return f'llama-server stopped answering /health ({misses} checks)'
        finally:
            exited.cancel()

    async def _terminate(self, stop_timeout: float) -> None:
        """SIGTERM the group, SIGKILL after `stop_timeout`, always reap."""
        proc = self._proc  # cleared only once reaped: a stop() that cancels a terminate half-way finishes it
        if proc is None:
            return
        if proc.returncode is None:
            await self._signal_until_exit(proc, stop_timeout)
        await self._drain_readers()
        if self._proc is proc:
            self._proc = None
        if self.registry is not None:
            await asyncio.to_thread(self.registry.remove, proc.pid)

    async def _signal_until_exit(self, proc: asyncio.subprocess.Process, stop_timeout: float) -> None:
        """SIGTERM, another after TERM_RESEND_S, SIGKILL after `stop_timeout`, or 1 s after "terminating immediately".

        llama-server can lose a SIGTERM that lands during its start-up (it says it is cleaning up, then runs on:
        its main loop was not running yet), and a second one is honoured. A second one it hears is "terminating
        immediately": `exit()` from its signal handler, which can hang (the soak, `bench/soak.py`, saw it when the
        first SIGTERM had found a task still running: a request whose client was gone). So an exit still pending 1 s
        after that line is killed. Whatever is still running by then was drained or cut already: nobody waits on it.
        Measured in the soak: without the second SIGTERM, 2 stops in 30 min waited the whole 10 s; with it and the
        kill, none took more than ~2 s."""
        self._exit_now_at = None
        started = time.monotonic()
        deadline = started + stop_timeout
        _signal_group(proc.pid, signal.SIGTERM)
        resend_at: float | None = started + min(TERM_RESEND_S, stop_timeout / 2)
        while (now := time.monotonic()) < deadline:
            if resend_at is not None and now >= resend_at:
                resend_at = None
                _signal_group(proc.pid, signal.SIGTERM)
            if self._exit_now_at is not None and now - self._exit_now_at >= EXIT_HANG_S:
                log.warning('%s: still there %g s after "terminating immediately"; killing', self.model_id, EXIT_HANG_S)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), min(0.1, deadline - now))
                return
        else:
            log.warning('%s: no exit %g s after SIGTERM; killing', self.model_id, stop_timeout)
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()

    # ---- output --------------------------------------------------------------------------------------------
    async def _drain_readers(self) -> None:
        readers, self._readers = self._readers, []
        if readers:
            # EOF follows the exit at once unless a grandchild kept the pipe open; do not wait on one forever.
            _done, pending = await asyncio.wait(readers, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending and self._proc is not None:
                # Close our ends too, or their file descriptors stay open as long as the grandchild runs.
                transport = getattr(self._proc, '_transport', None)  # asyncio keeps it private; there is no API
                if transport is not None:
                    transport.close()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        buf = b''
        skipping = False  # past MAX_LINE of the current line: drop up to its end
        while chunk := await stream.read(READ_CHUNK):
            full = len(chunk) == READ_CHUNK
            if skipping:
                end = chunk.find(b'\n')
                chunk = b'' if end < 0 else chunk[end + 1 :]
                skipping = end < 0
            buf += chunk
            *lines, buf = buf.split(b'\n')
            for line in lines:
                self._line(line if len(line) <= MAX_LINE else line[:MAX_LINE] + CUT_NOTE)
            if len(buf) > MAX_LINE:
                self._line(buf[:MAX_LINE] + CUT_NOTE)
                buf, skipping = b'', True
            if not full:  # a trickle: let it gather (a full read means more is waiting: read on)
                await asyncio.sleep(READ_PAUSE_S)
        if buf:
            self._line(buf)

    def _line(self, raw: bytes) -> None:
        line = raw.decode('utf-8', errors='replace').rstrip('\r')
        if not line:
            return
        self.tail.append(line)
        self.logs.add_llama_line(self.model_id, line)
        if _EXIT_NOW in line:
            self._exit_now_at = time.monotonic()
        if self.state == ModelState.STARTING:
            for marker, value in _PROGRESS_MARKERS:
                if marker in line and (self.progress or 0) < value:
                    self._set(ModelState.STARTING, progress=value)
                    break


def _exit_reason(tail: list[str]) -> str:
    """What to say about a server that exited while loading: its error lines when it printed some (a refused
    argument is followed by its usage text, which says nothing), else its last three lines. A crash's backtrace
    (ggml prints one through gdb when it aborts, e.g. "Failed to connect" to an RPC worker) is left out."""
    lines = [line.strip() for line in tail if not _BACKTRACE.match(line)]
    errors = [line for line in lines if _ERROR_WORDS.search(line)]
    return ' | '.join(errors[-3:] or lines[-3:])


_ERROR_WORDS = re.compile(r'error|invalid|failed|crashed', re.IGNORECASE)
# gdb's lines in a ggml abort: frames, threads, "[Inferior 1 (process N) detached]", source-file misses.
_BACKTRACE = re.compile(
    r'^\s*(#\d+\s|\[New LWP|\[Inferior|\[Thread debugging|Using host libthread_db'
    r'|\d+\s+\S+: No such file|0x[0-9a-f]+ in )'
)


def _slots(params: Any) -> int:
    """The server's -np: the typed field, or the value after -np/--parallel in extra_args (the last one wins)."""
    if params is None:
        return AUTO_SLOTS
    slots = params.parallel
    extra = list(params.extra_args or [])
    for flag, value in itertools.pairwise(extra):
        if flag in ('-np', '--parallel') and value.isdigit() and int(value) > 0:
            slots = int(value)
    return slots or AUTO_SLOTS


def _loopback_client(timeout: httpx.Timeout | float) -> httpx.AsyncClient:
    """Plain-HTTP loopback client. The default client loads the CA bundle (40-70 ms of blocked event loop),
    and must not pick up HTTP(S)_PROXY from the environment."""
    return httpx.AsyncClient(timeout=timeout, verify=False, trust_env=False)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _consume(fut: asyncio.Future[Any]) -> None:
    # A start that nobody awaited must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()
