"""The scheduler: the one owner of which llama-server runs.

Admissions (start a stopped model, evicting others to make room) are serialised by one lock, so two loads never
race for the same memory. Requests for a model that is already ready never touch that lock. A model with requests
in flight (or callers waiting for it) is drained before it is evicted, up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from core import launch_policy as policy
from core.fsutil import write_private
from core.model_params import ModelParams, effective_params
from core.settings import allowed_rpc_workers, rpc_refusal
from core.supervisor.argv import LaunchSpec, accepted_flags, check_policy, validate_params
from core.supervisor.errors import ArgvError, ModelNotFound, ModelUnusable, NoCapacity, StartFailed
from core.supervisor.pidfile import PidRegistry
from core.supervisor.process import Launch, ServerProcess, Timings, Upstream
from core.supervisor.states import ModelState

log = logging.getLogger(__name__)
TTL_RECHECK_S = 60.0

MIB = 1024 * 1024
REGISTRY_FILE = 'llama-servers.json'
KEYS_DIR = 'server-keys'


class _LaunchInfo:
    def __init__(self, params: ModelParams, need_mb: float | None, signature: tuple[Any, ...] = ()) -> None:
        self.params = params  # supervisor-only fields (ttl, pinned) are replaced live by `apply_config`
        self.need_mb = need_mb
        self.signature = signature  # the launch's argv (port 0) and env: what a config change is compared with


@dataclass(frozen=True)
class _Plan:
    spec: LaunchSpec
    help_text: str
    roots: list[Path]
    env: dict[str, str]
    flags: AbstractSet[str]
    key_file: Path | None
    signature: tuple[Any, ...]


class Lease:
    """One caller's hold on a ready model (see `Scheduler.lease`); a class, not a generator, as it is per request."""

    __slots__ = ('_on_progress', '_proc', '_scheduler', 'model')

    def __init__(self, scheduler: Scheduler, model: str, on_progress: Callable[[dict[str, Any]], Any] | None) -> None:
        self._scheduler, self.model, self._on_progress = scheduler, model, on_progress
        self._proc: ServerProcess | None = None

    async def __aenter__(self) -> Upstream:
        self._proc = await self._scheduler._acquire(self.model, self._on_progress)
        return self._proc.upstream()

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._scheduler.release(self._proc)
            self._proc = None


class Scheduler:
    def __init__(self, config: Any, library: Any, binary: Any, logs: Any, bus: Any, data_dir: Path) -> None:
        self.config = config
        self.library = library
        self.binary = binary
        self.logs = logs
        self.bus = bus
        self.data_dir = Path(data_dir)
        self.registry = PidRegistry(self.data_dir / REGISTRY_FILE)
        self._procs: dict[str, ServerProcess] = {}
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._admit = asyncio.Lock()
        self._changed = asyncio.Event()
        self._change_waiters = 0
        # The TTL loop waits on this, not on `_changed`: that is set twice per request by `lease`.
        self._states_changed = asyncio.Event()
        self._listeners: dict[str, set[Callable[[dict[str, Any]], Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: set[str] = set()  # models being stopped because their file went away or changed
        self._library_sub: Any = None
        self._ttl_task: asyncio.Task[None] | None = None
        self._stopping = False
        # Swapping for a config change: new requests wait for the new server (not counted as busy, so the drain
        # is for the requests already in flight).
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._stale: set[str] = set()  # saved again while restarting: compared again once the new server is up
        self._unloaded: set[str] = set()  # unloaded while restarting: not started again
        self._apply_lock = asyncio.Lock()  # one apply at a time (the API, the pages and the file watcher)
        self._preloaded: set[str] = set()  # the preloads already started once (by name as configured)

    @property
    def settings(self) -> Any:
        return self.config.settings

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        reaped = await asyncio.to_thread(self.registry.reap)
        if reaped:
            log.warning('reaped %d llama-server process(es) left by an earlier run: %s', len(reaped), reaped)
        self._ttl_task = asyncio.create_task(self._ttl_loop(), name='scheduler ttl')
        self._library_sub = self.bus.subscribe(['models'], self._on_library)
        self._preloaded = set(self._preloads())
        for name in self._preloaded:
            self._spawn_task(self._preload(name))

    def _preloads(self) -> list[str]:
        """The `preload` list, then the models whose parameters say `preload`."""
        flagged = [mid for mid, p in (self.settings.models or {}).items() if p.preload]
        return list(dict.fromkeys([*self.settings.preload, *flagged]))

    async def stop(self) -> None:
        self._stopping = True
        if self._library_sub is not None:
            self._library_sub.close()
            self._library_sub = None
        for task in [*self._tasks, *self._starts.values(), *self._restarts.values(), self._ttl_task]:
            if task is not None:
                task.cancel()
        await self.unload_all()
        if self._ttl_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ttl_task
            self._ttl_task = None

    def _on_library(self, event: Any) -> None:
        """A running model whose file went away or changed is stopped (after its requests drain): it would keep
        serving a file that is no longer there, or the old one. The next request starts the new file."""
        if event.type != 'library' or self._stopping:
            return
        for why, ids in (
            ('its file was removed', event.data.get('removed')),
            ('its file changed', event.data.get('changed')),
        ):
            for model_id in ids or []:
                proc = self._procs.get(model_id)
                if proc is not None and proc.active and model_id not in self._retiring:
                    self._retiring.add(model_id)
                    self._spawn_task(self._retire(proc, why))

    async def _retire(self, proc: ServerProcess, why: str) -> None:
        try:
            log.warning('stopping %s: %s', proc.model_id, why)
            self.bus.publish('models', 'retired', {'model': proc.model_id, 'reason': why})
            await self._evict(proc, self.settings.drain_timeout)
            self._notify()
        finally:
            self._retiring.discard(proc.model_id)

    async def _preload(self, name: str) -> None:
        try:
            await self.load(name)
        except (ModelNotFound, ModelUnusable, StartFailed, NoCapacity) as e:
            log.error('preload of %s failed: %s', name, e.message)

    # ---- reading -------------------------------------------------------------------------------------------
    def describe(self, model_id: str) -> dict[str, Any]:
        """Live status of one model for /api/models: status, pid, port, uptime_s, restarts, inflight, error."""
        proc = self._procs.get(model_id)
        if proc is None:
            entry = self.library.get(model_id)
            proc = self._procs.get(entry.id) if entry is not None else None
        if proc is None:
            return {
                'status': ModelState.STOPPED,
                'pid': None,
                'port': None,
                'uptime_s': None,
                'restarts': 0,
                'inflight': 0,
                'error': None,
                'progress': None,
                'slots': None,
            }
        return proc.describe()

    def running(self) -> list[Upstream]:
        return [p.upstream() for p in self._procs.values() if p.state == ModelState.READY]

    def params_for(self, model_id: str) -> ModelParams:
        return effective_params(self.settings, model_id)

    async def check_params(self, params: ModelParams) -> None:
        """Raise ArgvError if `params` are refused by the launch policy or the current llama-server cannot start
        with them (the flags are checked only when a binary is found)."""
        roots = await asyncio.to_thread(self.library.roots)
        if await asyncio.to_thread(self.binary.resolve) is None:
            await asyncio.to_thread(check_policy, params, roots)
            return
        await asyncio.to_thread(validate_params, params, await asyncio.to_thread(self.binary.help_text), roots)

    # ---- requests ------------------------------------------------------------------------------------------
    async def ensure_ready(self, model: str) -> Upstream:
        """Start `model` if needed (evicting others to make room) and return where it listens."""
        entry = self._entry(model)
        proc = self._proc(entry.id)
        await self._after_restart(entry.id)
        for _ in range(3):  # a model evicted right after it came up is started again, within reason
            if proc.state == ModelState.READY:
                proc.last_used = time.monotonic()
                return proc.upstream()
            if proc.state == ModelState.FAILED:
                raise StartFailed(
                    f'{entry.id} failed: {proc.error} (load it again to retry)', list(proc.tail), entry.id
                )
            if proc.state in (ModelState.STARTING, ModelState.RESTARTING):
                await proc.wait_ready()
                continue
            task = self._starts.get(entry.id)
            if task is None:
                task = asyncio.create_task(self._admit_and_start(entry, proc), name=f'start {entry.id}')
                self._starts[entry.id] = task
                task.add_done_callback(functools.partial(self._start_done, entry.id))
            await asyncio.shield(task)
        raise NoCapacity(f'{entry.id} was evicted repeatedly while starting; too many models are being requested')

    async def server_gone(self, model_id: str, pid: int, timeout: float = 5.0) -> bool:
        """Whether the server with `pid` has died (a request found its port closed). If so, wait (up to `timeout`)
        until the supervisor has seen it go, so that the next lease waits for its successor instead of handing out
        the dead one again. Blocking only for a /proc read."""
        if _alive(pid):
            return False
        proc = self._procs.get(model_id)
        deadline = time.monotonic() + timeout
        while proc is not None and proc.state == ModelState.READY and proc.pid == pid:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._wait_change(left)
        return True

    def lease(self, model: str, on_progress: Callable[[dict[str, Any]], Any] | None = None) -> Lease:
        """`async with scheduler.lease(model) as upstream`: ready the model and count the caller in flight, so
        evictions wait for it.

        While it waits, `on_progress(data)` (sync or async) gets each `models`/`state` event's data: model, state,
        pid, port, progress (0..1 while starting), error, log_tail."""
        return Lease(self, model, on_progress)

    def lease_ready(self, model_id: str) -> ServerProcess | None:
        """Without waiting: count the caller in flight on the model's server if it is ready now (and not being
        swapped), as a lease does; `release(proc)` once answered. None: lease it the usual way."""
        proc = self._procs.get(model_id)
        if proc is None or proc.state != ModelState.READY or model_id in self._restarts:
            return None
        proc.inflight += 1
        proc.last_used = time.monotonic()
        self._notify()
        return proc

    async def _acquire(self, model: str, on_progress: Callable[[dict[str, Any]], Any] | None) -> ServerProcess:
        entry = self._entry(model)
        ready = self.lease_ready(entry.id)  # the common case: nothing to register
        if ready is not None:
            return ready
        proc = self._proc(entry.id)
        await self._after_restart(entry.id)
        proc.waiters += 1
        if on_progress is not None:
            self._listeners.setdefault(entry.id, set()).add(on_progress)
        try:
            await self.ensure_ready(entry.id)
            proc.inflight += 1  # no await since ensure_ready returned: the server is ready now
        finally:
            proc.waiters -= 1
            if on_progress is not None:
                self._listeners.get(entry.id, set()).discard(on_progress)
            self._notify()
        return proc

    def release(self, proc: ServerProcess) -> None:
        proc.inflight -= 1
        proc.last_used = time.monotonic()
        # A short keep_alive (0: unload once answered) expires now or soon: the TTL loop must look again.
        self._notify(states=proc.keep_alive_s is not None and 0 <= proc.keep_alive_s < TTL_RECHECK_S and not proc.busy)

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """How long the model stays loaded once idle, as the last request asked (Ollama's `keep_alive`, set by each
        of its requests): 0 unloads it as soon as its requests are answered, a negative value keeps it until
        something else unloads it, None goes back to its configured `ttl` (as does the next load)."""
        proc = self._procs.get(model_id)
        if proc is not None and proc.state == ModelState.READY and proc.keep_alive_s != seconds:
            proc.keep_alive_s = seconds
            self._notify(states=True)

    def busy(self, model_id: str) -> bool:
        proc = self._procs.get(model_id)
        return proc is not None and proc.busy

    def idle_deadline(self, model_id: str) -> float | None:
        """When (wall clock) the model unloads if it stays idle from now: its keep_alive or ttl; None for never."""
        proc = self._procs.get(model_id)
        ttl = _idle_ttl(proc) if proc is not None else None
        if proc is None or ttl is None:
            return None
        return time.time() + max(0.0, proc.last_used + ttl - time.monotonic())

    async def load(self, model: str) -> Upstream:
        """Explicit load (API, preload): like ensure_ready, but also retries a model that had `failed`. Raises
        Unloaded when an unload comes first.

        The caller counts as waiting, so a second load that needs the slot waits for this one to be ready and
        answered before it evicts it: two loads for one slot are served in order, not both failed."""
        entry = self._entry(model)
        proc = self._proc(entry.id)
        proc.reset()
        proc.waiters += 1
        try:
            return await self.ensure_ready(entry.id)
        finally:
            proc.waiters -= 1
            self._notify()

    async def unload(self, model: str) -> bool:
        """Stop the model now (requests in flight are cut). Returns whether anything was running."""
        proc = self._procs.get(model)
        if proc is None:
            entry = self.library.get(model)
            proc = self._procs.get(entry.id) if entry is not None else None
        if proc is not None and proc.model_id in self._restarts:  # a swap in progress: it ends stopped
            self._unloaded.add(proc.model_id)
        if proc is None or proc.state == ModelState.STOPPED:
            return False
        await proc.stop(self.settings.stop_timeout, unload=True)
        self._notify()
        return True

    async def unload_all(self) -> int:
        procs = [p for p in self._procs.values() if p.state != ModelState.STOPPED]
        await asyncio.gather(*(p.stop(self.settings.stop_timeout) for p in procs), return_exceptions=True)
        self._notify()
        return len(procs)

    # ---- live configuration --------------------------------------------------------------------------------
    async def apply_config(self) -> dict[str, list[str]]:
        """Bring the running servers in line with the settings now in force. Each running model's launch (argv
        and env) is compared with the one it was started with: a changed one restarts with the new launch once
        its requests have drained (`drain_timeout`; new requests wait for the new server), as one swap, in the
        background; an unchanged one keeps its process, and its supervisor-only fields (ttl, pinned) apply at
        once. Stopped models use the new values when they next start. Returns model ids by outcome."""
        async with self._apply_lock:
            if self._stopping:
                return {'restarting': [], 'unchanged': [], 'kept_invalid': []}
            return await self._apply()

    async def _apply(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {'restarting': [], 'unchanged': [], 'kept_invalid': []}
        for model_id in list(self._restarts):  # mid-swap: the new server is compared again once it is up
            self._stale.add(model_id)
            out['restarting'].append(model_id)
        for proc, params, plan, error in await self._compare(self.settings):
            info = proc.launch_info
            assert info is not None
            if plan is None:  # the new values cannot start this model: the running server stays
                log.error('%s keeps running with its old parameters: %s', proc.model_id, error)
                out['kept_invalid'].append(proc.model_id)
                continue
            if plan.signature == info.signature:
                info.params = params
                out['unchanged'].append(proc.model_id)
                continue
            out['restarting'].append(proc.model_id)
            why = _launch_diff(info.signature, plan.signature)
            task = asyncio.create_task(self._restart(proc, why), name=f'restart {proc.model_id}')
            self._restarts[proc.model_id] = task
            task.add_done_callback(functools.partial(self._restart_done, proc.model_id))
        self._notify(states=True)  # a ttl changed meanwhile: the TTL loop looks again
        self._spawn_task(self._fit_limits())
        preloads = self._preloads()
        for name in preloads:  # a preload set just now starts now (one the user unloaded since stays unloaded)
            entry = self.library.get(name)
            if name in self._preloaded or entry is None or self._proc(entry.id).state != ModelState.STOPPED:
                continue
            out.setdefault('starting', []).append(entry.id)
            self._spawn_task(self._preload(entry.id))
        self._preloaded = {name for name in preloads if self.library.get(name) is not None}  # the rest: once found
        return out

    async def _fit_limits(self) -> None:
        """max_loaded_models or memory_budget_mb lowered below what runs: evict until within them (idle models
        first, then the least recently used; never a pinned one), each after draining."""
        async with self._admit:
            while True:
                s = self.settings
                loaded = [p for p in self._procs.values() if p.active and p.model_id not in self._restarts]
                budget = s.memory_budget_mb
                if budget is not None:
                    for p in loaded:
                        entry = self.library.get(p.model_id)
                        if p.launch_info is not None and p.launch_info.need_mb is None and entry is not None:
                            p.launch_info.need_mb = await asyncio.to_thread(self._need_mb, entry, p.launch_info.params)
                over_count = s.max_loaded_models > 0 and len(loaded) > s.max_loaded_models
                used = sum((p.launch_info.need_mb or 0) if p.launch_info else 0 for p in loaded)
                if not over_count and not (budget is not None and used > budget):
                    return
                victims = [p for p in loaded if not (p.launch_info and p.launch_info.params.pinned)]
                if not victims:
                    log.warning('over max_loaded_models / memory_budget_mb, but every loaded model is pinned')
                    return
                victim = min(victims, key=lambda p: (p.busy, p.last_used))
                log.info('%s unloaded: the new limits leave no room for it', victim.model_id)
                await self._evict(victim, s.drain_timeout)

    async def preview(self, settings: Any) -> dict[str, list[str]]:
        """What `apply_config` would do if `settings` were in force; nothing is changed."""
        out: dict[str, list[str]] = {'restarting': [], 'unchanged': [], 'kept_invalid': []}
        for proc, _params, plan, _error in await self._compare(settings):
            assert proc.launch_info is not None
            key = 'kept_invalid' if plan is None else 'unchanged'
            if plan is not None and plan.signature != proc.launch_info.signature:
                key = ModelState.RESTARTING
            out[key].append(proc.model_id)
        return out

    async def command_line(self, model_id: str, params: ModelParams | None = None) -> list[str]:
        """The llama-server command line `model_id` starts with (`--port 0`: a free port is picked at each start).
        Raises ModelNotFound, ModelUnusable or StartFailed (with the reason the launch is refused)."""
        entry = self._entry(model_id)
        plan = await self._plan(entry, params if params is not None else self.params_for(entry.id))
        return list(plan.signature[0])

    async def _compare(self, settings: Any) -> list[tuple[ServerProcess, ModelParams, _Plan | None, str]]:
        """Each running model, its params under `settings`, and the launch they make (None, and why, if they
        cannot start it)."""
        out: list[tuple[ServerProcess, ModelParams, _Plan | None, str]] = []
        for proc in list(self._procs.values()):
            if (
                proc.state not in (ModelState.READY, ModelState.STARTING)
                or proc.launch_info is None
                or proc.model_id in self._restarts
            ):
                continue
            entry = self.library.get(proc.model_id)
            if entry is None or entry.error:
                continue
            params = effective_params(settings, entry.id)
            try:
                out.append((proc, params, await self._plan(entry, params), ''))
            except StartFailed as e:
                out.append((proc, params, None, e.message))
        return out

    async def _after_restart(self, model_id: str) -> None:
        """Wait while a config change swaps the model's server (its failure is the next start's to report)."""
        restart = self._restarts.get(model_id)
        if restart is not None and restart is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await asyncio.shield(restart)

    async def _restart(self, proc: ServerProcess, why: str) -> None:
        model_id = proc.model_id
        while True:
            self._stale.discard(model_id)
            log.info('%s restarts for a configuration change: %s', model_id, why)
            self.bus.publish('models', 'restart', {'model': model_id, 'reason': f'configuration changed: {why}'})
            await self._evict(proc, self.settings.drain_timeout)
            if model_id in self._unloaded or self._stopping:
                return  # unloaded meanwhile: it stays down
            try:
                await self.load(model_id)
            except StartFailed:
                if model_id in self._unloaded or self._stopping:
                    return
                raise
            if model_id not in self._stale or proc.launch_info is None:
                return
            # Saved again while it restarted: the new server may already have the newest values.
            entry = self._entry(model_id)
            params = self.params_for(model_id)
            plan = await self._plan(entry, params)
            if plan.signature == proc.launch_info.signature:
                proc.launch_info.params = params
                return
            why = _launch_diff(proc.launch_info.signature, plan.signature)

    def _restart_done(self, model_id: str, task: asyncio.Task[None]) -> None:
        if self._restarts.get(model_id) is task:
            del self._restarts[model_id]
        self._stale.discard(model_id)
        self._unloaded.discard(model_id)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error('restart of %s failed: %s', model_id, error)
            self.bus.publish('models', 'restart_failed', {'model': model_id, 'error': str(error)})

    # ---- admission -----------------------------------------------------------------------------------------
    def _start_done(self, model_id: str, task: asyncio.Task[None]) -> None:
        self._starts.pop(model_id, None)
        if not task.cancelled():
            task.exception()  # retrieved by the awaiting callers; keep asyncio quiet when there are none

    async def _admit_and_start(self, entry: Any, proc: ServerProcess) -> None:
        if self._stopping:
            raise StartFailed(f'{entry.id}: the app is shutting down', model=entry.id)
        params = self.params_for(entry.id)
        plan = await self._plan(entry, params)  # bad parameters fail here, before anything is evicted
        launch = await self._launch(entry, plan)
        need_mb = self._need_mb(entry, params)
        async with self._admit:
            while proc.state == ModelState.STOPPING:  # an unload in progress; start again once it is down
                await self._wait_change(None)
            if proc.state not in (ModelState.STOPPED, ModelState.FAILED):
                return  # started meanwhile (e.g. preload); the caller waits on it
            await self._make_room(proc, params, need_mb)
            proc.launch_info = _LaunchInfo(params, need_mb, plan.signature)
            proc.start(launch)
            await proc.wait_ready()

    async def _plan(self, entry: Any, params: ModelParams) -> _Plan:
        """What `entry` would be started with under `params`, without side effects. Raises StartFailed."""
        binary = await asyncio.to_thread(self.binary.resolve)
        if binary is None:
            raise StartFailed(f'llama-server not found: {self.binary.how_to_install()}', model=entry.id)
        help_text = await asyncio.to_thread(self.binary.help_text)
        flags = accepted_flags(help_text)
        if params.alias is None and flags & {'--alias', '-a'}:
            # Replies then name the model by the id the client asked for, not by its file path.
            params = params.model_copy(update={'alias': entry.id})
        roots = await asyncio.to_thread(self.library.roots)
        try:
            params = await asyncio.to_thread(validate_params, params, help_text, roots)
        except ArgvError as e:
            raise StartFailed(f'{entry.id}: {e}', model=entry.id) from None
        refused = [e for e in params.rpc or [] if e not in allowed_rpc_workers(self.settings)]
        if refused:  # a config file edited by hand: saves refuse it already
            raise StartFailed(f'{entry.id}: rpc {rpc_refusal(refused[0])}', model=entry.id)
        mmproj = params.mmproj or getattr(entry, 'mmproj', None)
        spec = LaunchSpec(Path(binary.path), Path(entry.path), Path(mmproj) if mmproj else None, params)
        # The app's environment only in part (LLAMA_ARG_* would set flags we did not choose), then the model's.
        env = policy.child_env(binary.child_env(), params.env)
        key_file = key_path(self.data_dir, entry.id) if '--api-key-file' in flags else None
        try:
            argv = spec.argv(0, help_text, roots, key_file)
        except ArgvError as e:
            raise StartFailed(f'{entry.id}: {e}', model=entry.id) from None
        return _Plan(spec, help_text, roots, env, flags, key_file, (tuple(argv), tuple(sorted(env.items()))))

    async def _launch(self, entry: Any, plan: _Plan) -> Launch:
        spec, help_text, roots, key_file, flags = plan.spec, plan.help_text, plan.roots, plan.key_file, plan.flags
        env = dict(plan.env)
        # Each server requires its own key, so its port is no way around the app's keys and Host checks.
        key = secrets.token_urlsafe(32)
        api_key: str | None = key
        if key_file is not None:
            try:
                await asyncio.to_thread(write_private, key_file, f'{key}\n')
            except OSError as e:  # a full or read-only data dir
                if '--api-key' not in flags:  # a clear refusal, not a plain 500
                    raise StartFailed(
                        f'{entry.id}: cannot write its key file in the data dir ({e.strerror or e}); free some space '
                        f'in {self.data_dir} or make it writable',
                        model=entry.id,
                    ) from e
                # The environment is as private as a 0600 file (/proc/<pid>/environ is the owner's), so a full
                # disk does not stop a model from starting.
                log.warning('%s: key file not written (%s); the key goes in its environment', entry.id, e.strerror or e)
                key_file = None
                env['LLAMA_API_KEY'] = key
        elif '--api-key' in flags:
            env['LLAMA_API_KEY'] = key  # not on the command line, where `ps` shows it to every user
        else:
            api_key = None
            log.warning('%s: this llama-server has no --api-key: its port answers without a key', entry.id)
        s = self.settings
        timings = Timings(
            load_timeout=s.load_timeout,
            stop_timeout=s.stop_timeout,
            health_interval=s.health_interval,
            restart_backoff=s.restart_backoff,
        )
        return Launch(lambda port: spec.argv(port, help_text, roots, key_file), env, timings, api_key)

    def _need_mb(self, entry: Any, params: ModelParams) -> float | None:
        """Memory the model will take, from the library's fit estimate (only needed with a memory budget)."""
        if self.settings.memory_budget_mb is None:
            return None
        try:
            fit = self.library.fit(entry, params)
        except Exception:
            log.exception('fit estimate for %s failed; using the file size', entry.id)
            fit = None
        if fit is not None:  # RAM and VRAM both count against the one budget
            return (fit.ram_needed_bytes + fit.vram_needed_bytes) / MIB
        return float(getattr(entry, 'size_bytes', 0) or 0) / MIB

    async def _make_room(self, target: ServerProcess, params: ModelParams, need_mb: float | None) -> None:
        s = self.settings
        budget = s.memory_budget_mb
        if budget is not None and need_mb is not None and need_mb > budget:
            raise NoCapacity(f'{target.model_id} needs ~{need_mb:.0f} MiB, more than memory_budget_mb={budget}')
        deadline = time.monotonic() + max(s.drain_timeout, 1.0)
        while True:
            loaded = [p for p in self._procs.values() if p is not target and p.active]
            over_count = s.max_loaded_models > 0 and len(loaded) + 1 > s.max_loaded_models
            used = sum((p.launch_info.need_mb or 0) if p.launch_info else 0 for p in loaded)
            over_memory = budget is not None and need_mb is not None and used + need_mb > budget
            if not over_count and not over_memory:
                return
            victims = [p for p in loaded if not (p.launch_info and p.launch_info.params.pinned)]
            if not victims:
                if time.monotonic() >= deadline:
                    raise NoCapacity(
                        f'cannot load {target.model_id}: every loaded model is pinned '
                        f'(max_loaded_models={s.max_loaded_models}, memory_budget_mb={budget})'
                    )
                await self._wait_change(deadline - time.monotonic())
                continue
            # Idle models first, then the least recently used.
            victim = min(victims, key=lambda p: (p.busy, p.last_used))
            await self._evict(victim, s.drain_timeout)

    async def _evict(self, victim: ServerProcess, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        if victim.busy:
            log.info('draining %s (%d in flight) before evicting it', victim.model_id, victim.inflight)
        while victim.busy and time.monotonic() < deadline:
            await self._wait_change(deadline - time.monotonic())
        if victim.busy:
            log.warning(
                'evicting %s with %d request(s) still in flight after drain_timeout=%g s',
                victim.model_id,
                victim.inflight,
                drain_timeout,
            )
        log.info('evicting %s', victim.model_id)
        await victim.stop(self.settings.stop_timeout)

    # ---- TTL -----------------------------------------------------------------------------------------------
    async def _ttl_loop(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            next_at: float | None = None
            for proc in list(self._procs.values()):
                ttl = _idle_ttl(proc)
                if ttl is None or proc.state != ModelState.READY:
                    continue
                if proc.busy:  # look again once it may have gone idle (a request only ever postpones expiry)
                    # Not sooner than a second: a ttl of 0 (keep_alive 0) would spin here while it generates; its
                    # release wakes this loop anyway (`release`).
                    again = now + max(ttl, 1.0)
                    next_at = again if next_at is None else min(next_at, again)
                    continue
                expires = proc.last_used + ttl
                if expires <= now:
                    why = 'keep_alive' if proc.keep_alive_s is not None else 'ttl'
                    log.info('%s idle for %g s (%s); unloading', proc.model_id, ttl, why)
                    try:
                        await proc.stop(self.settings.stop_timeout)
                    except Exception:
                        log.exception('ttl unload of %s failed', proc.model_id)
                else:
                    next_at = expires if next_at is None else min(next_at, expires)
            # At most a minute: a ttl set in the settings meanwhile is then noticed without a state change.
            timeout = TTL_RECHECK_S if next_at is None else min(TTL_RECHECK_S, max(0.0, next_at - time.monotonic()))
            await _wait_event(self._states_changed, timeout)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _entry(self, model: str) -> Any:
        entry = self.library.get(model)
        if entry is None:
            raise ModelNotFound(f'model {model!r} not found')
        if entry.error:  # never spawned: llama-server would fail on it, or block on a FIFO
            raise ModelUnusable(f'{entry.id} cannot be loaded: {entry.error}')
        return entry

    def _proc(self, model_id: str) -> ServerProcess:
        proc = self._procs.get(model_id)
        if proc is None:
            proc = ServerProcess(model_id, self.logs, self._on_state, self.registry)
            self._procs[model_id] = proc
        return proc

    def _on_state(self, data: dict[str, Any]) -> None:
        self.bus.publish('models', 'state', data)
        for cb in list(self._listeners.get(data['model'], ())):
            try:
                result = cb(data)
                if asyncio.iscoroutine(result):
                    self._spawn_task(result)
            except Exception:
                log.exception('progress listener failed')
        self._notify(states=True)

    def _notify(self, states: bool = False) -> None:
        """Wake everything waiting for a change of load, in-flight counts or (with `states`) process states."""
        if self._change_waiters:  # called twice per request: an event nobody waits on is left as it is
            self._changed.set()
            self._changed = asyncio.Event()
        if states:
            self._states_changed.set()
            self._states_changed = asyncio.Event()

    async def _wait_change(self, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        self._change_waiters += 1
        try:
            await _wait_event(self._changed, timeout)
        finally:
            self._change_waiters -= 1

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _launch_diff(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    """What differs between two launch signatures, in words for the log and the event: `--ctx-size 2048 -> 4096`."""
    before, after = _flag_values(old[0] if old else ()), _flag_values(new[0])
    parts = [
        f'{flag} {before.get(flag, "(unset)")} -> {after.get(flag, "(unset)")}'
        for flag in [*before, *(f for f in after if f not in before)]
        if before.get(flag) != after.get(flag)
    ]
    old_env, new_env = dict(old[1]) if old else {}, dict(new[1])
    env = sorted(k for k in {*old_env, *new_env} if old_env.get(k) != new_env.get(k))
    if env:
        parts.append('environment ' + ', '.join(env))
    return '; '.join(parts) or 'launch'


def _flag_values(argv: Iterable[str]) -> dict[str, str]:
    """`--flag value` pairs of an argv (a switch maps to ''); the binary, argv[0], is kept under ''."""
    items = list(argv)
    out: dict[str, str] = {'': items[0]} if items else {}
    i = 1
    while i < len(items):
        flag = items[i]
        value = items[i + 1] if i + 1 < len(items) and not _is_flag(items[i + 1]) else None
        out[flag] = (out[flag] + ',' if flag in out else '') + (value or '')
        i += 2 if value is not None else 1
    return out


def _is_flag(token: str) -> bool:
    return token.startswith('-') and not policy.is_number(token)


def _alive(pid: int) -> bool:
    """A running process (not a zombie waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _idle_ttl(proc: ServerProcess) -> float | None:
    """Seconds idle before it unloads: this load's keep_alive if one was asked for, else its `ttl`; None: never."""
    if proc.keep_alive_s is not None:
        return None if proc.keep_alive_s < 0 else proc.keep_alive_s
    ttl = proc.launch_info.params.ttl if proc.launch_info else None
    return ttl or None


def key_path(data_dir: Path, model_id: str) -> Path:
    """Where the key of the model's llama-server is kept (0600, in a 0700 folder of the data dir)."""
    return Path(data_dir) / KEYS_DIR / f'{hashlib.sha256(model_id.encode()).hexdigest()[:20]}.key'


async def _wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait for `event` or `timeout`. Not `asyncio.wait_for`: on 3.11 it swallows a cancel that arrives together
    with the event being set, which left `stop()` waiting on a loop that never saw its cancellation."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
