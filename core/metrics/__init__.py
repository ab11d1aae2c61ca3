"""Metrics: the one shared sampler (psutil, NVML, each llama-server's /metrics and /slots, proxy figures), history,
alerts, Prometheus exposition and the `/api/events` stream.

One asyncio task samples every `metrics_interval` seconds, however many pages or clients watch; blocking reads
(psutil, NVML, SQLite) run in a worker thread. Each sample is published as one `metrics` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from typing import Any

from core import gpu
from core.events import Event, EventBus, Subscription
from core.metrics.alerts import Alerts
from core.metrics.exposition import Exposition
from core.metrics.history import History, flatten
from core.metrics.host import HostSampler
from core.metrics.llama import LlamaScraper
from core.metrics.requests import RequestStats, from_event

UNKNOWN_MODEL = '(unknown)'  # the metrics label of a request for a model that does not exist

log = logging.getLogger(__name__)


def _field(item: Any, *names: str) -> Any:
    """Read a field of a `running()` entry, whether it is a dataclass, a named tuple or a dict."""
    for name in names:
        value = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
        if value is not None:
            return value
    return None


class MetricsService:
    def __init__(
        self, config: Any, scheduler: Any, library: Any, store: Any, bus: EventBus, logs: Any | None = None
    ) -> None:
        self.config, self.scheduler, self.library, self.store, self.bus = config, scheduler, library, store, bus
        self.history_error: str | None = None  # why the metric history on disk is behind, while it is
        self.logs = logs
        self.host = HostSampler()
        self.scraper = LlamaScraper()
        self.history = History(store, config.settings.metrics_interval)
        self.alerts = Alerts(config, bus)
        self.requests = RequestStats()
        self._finished: deque[tuple[dict[str, Any], float]] = deque(maxlen=100_000)  # bounded between samples
        self.exposition = Exposition(lambda: self.latest, lambda: len(self.alerts.active))
        self.latest: dict[str, Any] | None = None
        self.samples_taken = 0
        self._task: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._sample_lock = asyncio.Lock()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._subs = [
            self.bus.subscribe(['requests'], self._on_request),
            self.bus.subscribe(['models'], self.alerts.on_model_event),
        ]
        self._task = asyncio.create_task(self._run(), name='metrics-sampler')

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in self._subs:
            sub.close()
        self._subs = []
        await self.scraper.aclose()
        try:
            await asyncio.to_thread(self.history.flush, True)
        except Exception:
            log.exception('writing metric history failed')

    def register_routes(self, frontdoor: Any) -> None:
        """`/api/events` runs on the front door, outside NiceGUI's middleware, so disconnects are seen."""
        from core.metrics.stream import EventStream

        frontdoor.route('/api/events', EventStream(self).asgi)

    # ---- sampling ------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            interval = self.config.settings.metrics_interval
            try:
                await self.sample_once()
            except Exception:
                log.exception('metrics sample failed')
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # fell behind (suspended laptop, slow disk): skip the missed ticks
                next_at = now + interval
            await asyncio.sleep(next_at - now)

    def running(self) -> list[Any]:
        """Every ready llama-server (model id, pid, port, base_url), from the scheduler."""
        return list(self.scheduler.running())

    async def sample_once(self) -> dict[str, Any]:
        """Take one sample now, publish it, feed history and alerts. Returns the sample."""
        async with self._sample_lock:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            servers: dict[str, dict[str, Any]] = {}
            for item in self.running():
                model = _field(item, 'model_id', 'model', 'id')
                if model is None:
                    continue
                servers[str(model)] = {
                    'pid': _field(item, 'pid'),
                    'port': _field(item, 'port'),
                    'base_url': _field(item, 'base_url'),
                    'api_key': _field(item, 'api_key'),
                }
            pids = {m: int(v['pid']) for m, v in servers.items() if v['pid']}
            urls = {m: str(v['base_url']) for m, v in servers.items() if v['base_url']}
            keys = {m: key for m, v in servers.items() if (key := v.pop('api_key'))}  # never part of the sample
            models_dirs = list(self.config.settings.models_dirs)
            blocking = asyncio.to_thread(self._blocking_reads, models_dirs, pids)
            (host, gpu_status), llama = await asyncio.gather(blocking, self.scraper.scrape_all(urls, keys))

            pid_model = {pid: m for m, pid in pids.items()}
            models: dict[str, dict[str, Any]] = {}
            for model, info in servers.items():
                entry = {**info, **host['processes'].get(model, {}), 'llama': llama.get(model, {}), 'gpus': []}
                models[model] = entry
            for g in gpu_status['gpus']:
                g['models'] = sorted({pid_model[p] for p in g['pids'] if p in pid_model})
                for m in g['models']:
                    models[m]['gpus'].append(g['index'])
                for proc in g.get('processes') or []:
                    m = pid_model.get(proc.get('pid'))
                    if m is not None and proc.get('used_memory_bytes') is not None:
                        models[m]['vram_bytes'] = models[m].get('vram_bytes', 0) + proc['used_memory_bytes']

            sample = {
                'ts': time.time(),
                'interval_s': self.config.settings.metrics_interval,
                'system': host['system'],
                'gpu': gpu_status,
                'models': models,
                'proxy': self._proxy_summary(models),
            }
            sample['sample_ms'] = round((time.perf_counter() - t0) * 1000, 2)
            sample['sample_cpu_ms'] = round((time.process_time() - cpu0) * 1000, 2)  # whole process, this task's share
            self.latest = sample
            self.samples_taken += 1
            self.bus.publish('metrics', 'sample', sample)
            self.history.resize(sample['interval_s'])
            self.history.add(sample['ts'], flatten(sample))
            if self.history.pending:
                try:
                    await asyncio.to_thread(self.history.flush)
                except Exception as e:
                    if self.history_error is None:
                        log.exception('writing metric history failed')
                    self.history_error = f'metric history not written: {e}'
                else:
                    self.history_error = None
            self.alerts.evaluate(sample)
            return sample

    def _blocking_reads(self, models_dirs: list[Any], pids: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.host.sample(models_dirs, pids), gpu.status()

    def _in_flight(self, models: dict[str, Any]) -> int | None:
        describe = getattr(self.scheduler, 'describe', None)
        if describe is None:
            return None
        total = 0
        for model in models:
            try:
                total += int(describe(model).get('inflight') or 0)
            except Exception:
                continue
        return total

    def _on_request(self, event: Event) -> None:
        # Runs on the proxy's hot path, once per request: only queue it; `_drain` counts it when figures are read.
        if 'status' in event.data:  # only finished requests carry a status
            self._finished.append((event.data, event.ts))

    def _drain(self) -> None:
        while self._finished:
            data, ts = self._finished.popleft()
            req = from_event(data, ts)
            local = req.upstream == 'local'  # a remote's model name was one a remote lists: a real one
            if req.model and local and self.library is not None and self.library.get(req.model) is None:
                # A failed request keeps the name it asked for in its row; as a metrics label every made-up name
                # would be a new series, kept forever.
                req = dataclasses.replace(req, model=UNKNOWN_MODEL)
            self.requests.add(req)
            self.exposition.observe(req)

    def _proxy_summary(self, models: dict[str, Any]) -> dict[str, Any]:
        self._drain()
        return self.requests.summary(self._in_flight(models))

    # ---- reading -------------------------------------------------------------------------------------------
    async def current(self) -> dict[str, Any]:
        """The latest sample, taking one if none exists yet."""
        return self.latest if self.latest is not None else await self.sample_once()

    async def history_query(self, window: str, series: list[str] | None) -> dict[str, Any]:
        result = await asyncio.to_thread(self.history.query, window, series)
        result['available'] = self.history.series_names()
        return result

    def prometheus_text(self) -> bytes:
        self._drain()
        return self.exposition.render()

    def models_snapshot(self) -> list[dict[str, Any]]:
        """Every known model with its live state, for the first message of an event stream."""
        out: dict[str, dict[str, Any]] = {}
        try:
            entries = list(self.library.models())
        except Exception:
            entries = []
        ids = [str(getattr(e, 'id', e)) for e in entries]
        ids += [m for m in (self.latest or {}).get('models', {}) if m not in ids]
        for model in ids:
            try:
                state = dict(self.scheduler.describe(model))
            except Exception:
                state = {}
            out[model] = {'model': model, **state}
        return list(out.values())
