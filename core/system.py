"""The System: every core service built once and wired together. The only module that knows them all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core import __version__
from core.config_watch import ConfigWatcher
from core.events import Event, EventBus, Subscription
from core.frontdoor import FrontDoor
from core.hub import HubService
from core.hub.downloads import DownloadManager
from core.library import ModelLibrary
from core.llama_binary import BinaryResolver
from core.logs import LogService
from core.metrics import MetricsService
from core.model_params import effective_params
from core.ollama import OllamaAPI
from core.proxy import Proxy
from core.proxy.fastlane import FastLane
from core.remotes import Remotes
from core.settings import SettingsManager, UpdateResult
from core.store import Store
from core.supervisor import Scheduler
from core.supervisor.rpc_worker import RpcWorker

log = logging.getLogger(__name__)
PROBE_PREFIX = '.write-test-'  # the file written (and removed) to check that the data dir takes writes


class DataDirError(Exception):
    """The data dir cannot be created or written, so the app cannot start. The message is one line for the user
    (main.py prints it and exits with 2, no traceback)."""


def data_dir_message(path: Path, e: BaseException) -> str:
    if not isinstance(e, OSError):  # sqlite3.Error: "unable to open database file", ...
        why = str(e)
    else:
        why = e.strerror or str(e)
        name = str(e.filename or '')
        # A parent that is a file, a subfolder that cannot be made, ... (the probe's own name says nothing).
        if name and name != str(path) and not Path(name).name.startswith(PROBE_PREFIX):
            why = f'{why}: {name}'
    return (
        f'cannot use the data dir {path} ({why}). Set LAP_DATA_DIR (or "data_dir" in the config file) to a writable '
        'folder, or fix its permissions.'
    )


@contextlib.contextmanager
def data_dir_errors(path: Path, os_errors: bool = True) -> Iterator[None]:
    """Turn a failed write in the data dir (OSError; sqlite3.Error from the Store) into a DataDirError."""
    caught: tuple[type[Exception], ...] = (OSError, sqlite3.Error) if os_errors else (sqlite3.Error,)
    try:
        yield
    except caught as e:
        raise DataDirError(data_dir_message(path, e)) from None


def prepare_data_dir(path: Path) -> None:
    """Create the data dir (0700: keys, logs and request history are the user's) and write a file in it: a folder
    on a read-only mount passes mkdir(exist_ok=True) and would fail only at the first write. Raises DataDirError."""
    with data_dir_errors(path):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
        os.close(fd)
        os.unlink(probe)


class System:
    def __init__(self, config: SettingsManager) -> None:
        self.config = config
        s = config.settings
        self.version = __version__
        self.bus = EventBus()
        self.data_dir: Path = s.data_dir
        prepare_data_dir(self.data_dir)
        with data_dir_errors(self.data_dir):  # the logs folder, the SQLite file (a read-only one, a folder there)
            self.logs = LogService(
                self.bus,
                capacity=s.log_buffer_lines,
                log_dir=s.data_dir / 'logs',
                max_bytes=s.log_file_max_bytes,
                backups=s.log_file_backups,
            )
            self.store = Store(self.data_dir / 'lap.sqlite3')
        self.binary = BinaryResolver(config, self.data_dir)
        self.binary.resolve()  # once, before any page renders its status
        with data_dir_errors(self.data_dir, os_errors=False):  # the services create their SQLite tables
            self.library = ModelLibrary(config, self.store, self.bus)
            self.scheduler = Scheduler(config, self.library, self.binary, self.logs, self.bus, self.data_dir)
            self.remotes = Remotes(config, self.bus)
            self.rpc = RpcWorker(config, self.binary, self.logs, self.bus, self.scheduler.registry)
            self.library.rpc_memory = self.rpc_memory
            self.proxy = Proxy(config, self.scheduler, self.library, self.store, self.bus, self.remotes)
            self.metrics = MetricsService(config, self.scheduler, self.library, self.store, self.bus, logs=self.logs)
        # Raw ASGI routes and guards that run before NiceGUI's middleware (see core/frontdoor.py).
        self.frontdoor = FrontDoor()
        self.frontdoor.body_limit = lambda: self.config.settings.max_body_bytes
        self.proxy.register_routes(self.frontdoor)
        self.hub = HubService(config, self.library)
        self.downloads = DownloadManager(config, self.hub, self.bus, self.data_dir, on_done=self.library.rescan)
        self.ollama = OllamaAPI(self.proxy, self.library, self.scheduler, measured=lambda: self.metrics.latest)
        self.ollama.register_routes(self.frontdoor)
        self.metrics.register_routes(self.frontdoor)
        # Plain /v1 requests to a ready model, served from the HTTP protocol (core/proxy/fastlane.py).
        self.fast_lane = FastLane(self.proxy, self.frontdoor)
        self._log_handler: logging.Handler | None = None
        watchable = hasattr(config, 'reload_file')  # a SettingsManager, not a test's bare settings holder
        self.config_watch = ConfigWatcher(config, self.apply_config, self.bus) if watchable else None
        self.started = False
        self._problems: list[str] = []  # as last published on the `health` topic
        self._health_watch: Subscription | None = None
        self._registry_retry: asyncio.Future[None] | None = None
        self._applied_settings = config.settings  # what `apply_config` last brought the servers in line with
        config.on_change(self._on_config_change)

    def install_logging(self) -> None:
        """Route the app's own `logging` into the log service (idempotent)."""
        if self._log_handler is None:
            self._log_handler = self.logs.handler()
            logging.getLogger().addHandler(self._log_handler)
        logging.getLogger().setLevel(self.config.settings.log_level.upper())
        # One line per health poll and metrics scrape would bury everything else.
        for noisy in ('httpx', 'httpcore', 'watchfiles'):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    async def start(self) -> None:
        self.bus.attach_loop(asyncio.get_running_loop())
        self.install_logging()
        binary = await asyncio.to_thread(self.binary.resolve)
        if binary is None:
            log.warning('llama-server not found. %s', self.binary.how_to_install())
        else:
            log.info('llama-server %s at %s', binary.version, binary.path)
        await self.library.start()
        await self.scheduler.start()
        await self.rpc.start()  # after the scheduler's reap of what an earlier run left
        await self.proxy.start()
        await self.metrics.start()
        await self.downloads.start()
        await self.remotes.start()
        self._health_watch = self.bus.subscribe(['metrics', 'models'], self._watch_writes)  # not per request
        if self.config_watch is not None:
            await self.config_watch.start()
        self.started = True

    async def stop(self) -> None:
        # Reverse order: stop taking requests, then stop the children, then the rest.
        if self._health_watch is not None:
            self._health_watch.close()
        if self.config_watch is not None:
            await self.config_watch.stop()
        # The RPC worker after the scheduler: the models split over it stop first, not abort on a lost worker.
        for name in ('remotes', 'downloads', 'proxy', 'metrics', 'scheduler', 'rpc', 'library'):
            try:
                await getattr(self, name).stop()
            except Exception:
                log.exception('stopping %s failed', name)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler = None
        self.logs.close()
        self.store.close()
        self.started = False

    def problems(self) -> list[str]:
        """What is degraded while the proxy keeps serving: writes to the data dir that failed (a full or read-only
        disk) and are retried. In memory: the header asks on every redraw."""
        found = [
            self.scheduler.registry.write_error and f'pid registry not written: {self.scheduler.registry.write_error}',
            self.proxy.activity.write_error,
            self.metrics.history_error,
            self.logs.write_error,
        ]
        return [p for p in found if p]

    def _watch_writes(self, event: Event) -> None:
        # Looked at on each metrics sample (1 s) and model state change, not per request: a failed flush of the
        # request rows shows within a sample. The registry is written again each sample while it is behind.
        registry = self.scheduler.registry
        if event.topic == 'metrics' and registry.write_error is not None and self._registry_retry is None:
            self._registry_retry = asyncio.ensure_future(asyncio.to_thread(registry.retry))
            self._registry_retry.add_done_callback(self._registry_retried)
        self._publish_problems()

    def _registry_retried(self, task: asyncio.Future[None]) -> None:
        self._registry_retry = None
        if not task.cancelled() and task.exception() is not None:
            log.error('pid registry retry failed', exc_info=task.exception())
        self._publish_problems()

    def _publish_problems(self) -> None:
        """One `health/problems` event per change (an empty list: everything is written again)."""
        now = self.problems()
        if now != self._problems:
            self._problems = now
            self.bus.publish('health', 'problems', {'problems': now})

    async def create_demo_model(self) -> Path:
        """The first-run demo model (core/library/demo.py), written into the first models folder; with none set,
        into `<data dir>/models`, which is then saved as one. The library lists it once this returns."""
        from core.library.demo import create_demo_model

        dirs = list(self.config.settings.models_dirs)
        folder = Path(dirs[0]) if dirs else self.data_dir / 'models'  # the settings expand ~ already
        path = await asyncio.to_thread(create_demo_model, folder)
        if not dirs:
            await self.save_config({'models_dirs': [str(folder)]})
        await self.library.rescan()
        return path

    def rpc_memory(self, endpoints: list[str]) -> list[int | None]:
        """Free memory each RPC worker offers, for the fit estimate: this app's own worker, or a node's (from its
        last check); None for a worker known to neither."""
        return [
            self.rpc.free_at(e) or next((f for r in self.remotes.all() if (f := r.rpc_free(e))), None)
            for e in endpoints
        ]

    def health(self) -> dict[str, Any]:
        b = self.binary.current
        problems = self.problems()
        return {
            'status': 'degraded' if problems else 'ok',
            'problems': problems,
            'version': self.version,
            'llama_server': None if b is None else {'path': str(b.path), 'version': b.version, 'source': b.source},
        }

    async def save_config(self, patch: dict[str, Any]) -> tuple[UpdateResult, dict[str, list[str]]]:
        """Save `patch` (validated, written atomically; raises ConfigInvalid) and apply it: the one path of the
        REST API and the pages (a hand edit of the file takes `apply_config` through the watcher)."""
        result = await asyncio.to_thread(self.config.update, patch)
        return result, await self.apply_config()

    async def save_model_params(
        self, model_id: str, params: dict[str, Any] | None
    ) -> tuple[UpdateResult, dict[str, list[str]]]:
        """Like `save_config`, for one model's parameters only (the others are read under the same lock)."""
        result = await asyncio.to_thread(self.config.update_model, model_id, params)
        return result, await self.apply_config()

    async def apply_config(self) -> dict[str, list[str]]:
        """After a saved change: restart the running servers whose launch it changed (and only those), and say
        which stopped models will start with new values (`next_start`); published as a `config` event."""
        applied = await self.scheduler.apply_config()
        applied['next_start'] = self._next_start()
        self.bus.publish('config', 'applied', applied)
        return applied

    def _next_start(self) -> list[str]:
        """Stopped models whose parameters changed since the last apply."""
        before, after = self._applied_settings, self.config.settings
        self._applied_settings = after
        out = []
        for entry in self.library.models():
            state = self.scheduler.describe(entry.id).get('status')
            if state in ('stopped', 'failed') and effective_params(before, entry.id) != effective_params(
                after, entry.id
            ):
                out.append(entry.id)
        return out

    def _on_config_change(self, settings: Any, changed: list[str]) -> None:
        self.bus.publish('config', 'changed', {'changed': changed})
        if 'log_level' in changed:
            logging.getLogger().setLevel(settings.log_level.upper())
        if {'log_buffer_lines', 'log_file_max_bytes', 'log_file_backups'} & set(changed):
            self.logs.configure(settings.log_buffer_lines, settings.log_file_max_bytes, settings.log_file_backups)
        if 'llama_server_path' in changed:
            self.binary.invalidate()
