"""Remotes: models served by other machines, from static membership in config (`Settings.remotes`), a health
check per remote, and plain HTTP; no cluster protocol of our own.

- `openai`: any OpenAI-compatible server (another llama-server, vLLM, a hosted API). Its models come from its
  `/v1/models` (or are given), refreshed with each check.
- `node`: another instance of this app, reached with its admin key. Its models, their states and its fit estimate
  for each come from its `/api/models`, its memory and live figures from `/api/monitoring`; a model is loaded or
  unloaded there through its own `/api/models/{id}/load|unload`.

A remote is checked every `check_interval` seconds (5 for a node, 30 else) while up and every `DOWN_RETRY_S` while
down, so one that comes back is used again by itself. A request the proxy forwards carries `x-lap-forwarded`: the
app that receives it serves it from its own models only and lists only those, so two nodes that name each other
never pass a request, or a model list, back and forth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import httpx

from core.remote_params import RemoteParams
from core.supervisor.process import Upstream
from core.supervisor.rpc_worker import devices_free_bytes

if TYPE_CHECKING:
    from core.events import EventBus
    from core.settings import Settings, SettingsManager

log = logging.getLogger(__name__)

FORWARDED = b'x-lap-forwarded'
DOWN_RETRY_S = 2.0
READ_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 600.0  # a load on a node waits for its llama-server to be ready (its load_timeout)
MAX_IDLE = 16  # kept-alive connections per remote


class RemoteState(StrEnum):
    CHECKING = 'checking'  # configured, not answered yet
    UP = 'up'
    DOWN = 'down'


@dataclass(slots=True)
class RemoteModel:
    id: str  # as listed here: `prefix/name` or an alias
    own_id: str  # its name on the remote
    status: str | None = None  # a node's ModelState for it; None for an OpenAI server (always ready to take it)
    row: dict[str, Any] = field(default_factory=dict)  # a node's /api/models row (size, fit, meta, ...)


class RemoteDown(Exception):
    """The model lives only on remotes that are down; answered 503."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Remote:
    """One configured remote: its state, its models, its figures (a node's), and how to reach it."""

    def __init__(self, params: RemoteParams) -> None:
        self.params = params
        self.state = RemoteState.CHECKING
        self.error: str | None = None
        self.checked_at: float | None = None
        self.latency_ms: float | None = None
        self.models: dict[str, RemoteModel] = {}  # listed id -> model
        self.monitoring: dict[str, Any] | None = None  # a node's latest /api/monitoring sample
        self.rpc: dict[str, Any] | None = None  # a node's RPC worker (/api/rpc-server)
        self.busy: dict[str, int] = {}  # its own model id -> requests in flight to it from here
        self.tls = _tls_context(params)
        self.wake = asyncio.Event()
        headers = tuple((k.lower().encode(), v.encode('latin-1')) for k, v in self.auth_headers().items())
        self.upstream = Upstream(
            model_id='',
            host=params.host,
            port=params.port,
            base_url=params.url,
            pid=0,
            headers=headers,
            slots=MAX_IDLE,
            tls=self.tls,
            connect_timeout=params.connect_timeout,
            response_timeout=params.response_timeout,
        )

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def up(self) -> bool:
        return self.state == RemoteState.UP

    def target(self, path: str) -> str:
        """The path to ask that server for `path` (`/v1/...`): below the base URL's own path, if any."""
        return self.params.root_path + path

    def auth_headers(self) -> dict[str, str]:
        out = {FORWARDED.decode(): '1'}
        if self.params.api_key:
            out['Authorization'] = f'Bearer {self.params.api_key}'
        return out

    def as_dict(self) -> dict[str, Any]:
        p = self.params
        return {
            'name': p.name,
            'url': p.url,
            'kind': p.kind,
            'prefix': p.prefix,
            'state': str(self.state),
            'error': self.error,
            'checked_at': self.checked_at,
            'latency_ms': self.latency_ms,
            'inflight': sum(self.busy.values()),
            'models': [
                {'id': m.id, 'own_id': m.own_id, 'status': m.status, **_row_summary(m.row)}
                for m in self.models.values()
            ],
            'monitoring': _monitoring_summary(self.monitoring),
            'rpc_server': _rpc_summary(self.rpc),
        }

    def rpc_free(self, endpoint: str) -> int | None:
        """The free memory a node's RPC worker offers, if `endpoint` is it (reached at the node's host)."""
        if not self.up or not self.rpc:
            return None
        host, _, port = endpoint.rpartition(':')
        bound_host, _, bound_port = str(self.rpc.get('endpoint') or '').rpartition(':')
        if port != bound_port or host not in (self.params.host, bound_host):
            return None
        return devices_free_bytes(self.rpc)


class Remotes:
    """Every configured remote, each checked by a task of its own; follows `remotes` in the settings live."""

    def __init__(self, config: SettingsManager, bus: EventBus) -> None:
        self.config, self.bus = config, bus
        self._remotes: dict[str, Remote] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.config.on_change(self._settings_changed)
        self._sync(self.config.settings)

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._remotes.clear()

    def _settings_changed(self, settings: Settings, changed: list[str]) -> None:
        if 'remotes' in changed and self._loop is not None:  # saves run in threads: hop to the loop
            self._loop.call_soon_threadsafe(self._sync, settings)

    def _sync(self, settings: Settings) -> None:
        if self._stopped:
            return
        wanted = {p.name: p for p in settings.remotes}
        old: dict[str, Remote] = {}
        for name in list(self._remotes):
            if name not in wanted or wanted[name] != self._remotes[name].params:
                old[name] = self._remotes.pop(name)
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
        for name, params in wanted.items():
            if name in self._remotes:
                continue
            try:
                remote = Remote(params)
            except Exception as e:  # e.g. a CA file that went away since it was saved
                log.error('remote %s cannot be used: %s', name, e)
                continue
            before = old.get(name)
            if before is not None and (before.params.url, before.params.kind, before.params.api_key) == (
                params.url,
                params.kind,
                params.api_key,
            ):  # the same server: what is known of it stays known until the next check (no 404 meanwhile)
                remote.state, remote.error, remote.checked_at = before.state, before.error, before.checked_at
                remote.monitoring, remote.rpc = before.monitoring, before.rpc
                remote.models = _models(params, {m.own_id: (m.status, m.row, []) for m in before.models.values()})
            self._remotes[name] = remote
            self._tasks[name] = asyncio.create_task(self._watch(remote), name=f'remote {name}')
        self.bus.publish('remotes', 'configured', {'remotes': sorted(wanted)})

    # ---- reading -------------------------------------------------------------------------------------------
    def all(self) -> list[Remote]:
        return list(self._remotes.values())

    def get(self, name: str) -> Remote | None:
        return self._remotes.get(name)

    def holders(self, model: str) -> list[tuple[Remote, RemoteModel]]:
        """Every remote that lists `model` (up or not), in config order."""
        return [(r, r.models[model]) for r in self._remotes.values() if model in r.models]

    def listed(self) -> list[tuple[Remote, RemoteModel]]:
        return [(r, m) for r in self._remotes.values() for m in r.models.values()]

    # ---- checks --------------------------------------------------------------------------------------------
    async def _watch(self, remote: Remote) -> None:
        async with httpx.AsyncClient(
            verify=remote.tls or True,
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=remote.params.connect_timeout),
            trust_env=False,  # a node on the LAN is not reached through the user's HTTP proxy
        ) as client:
            while True:
                try:
                    await self.check(remote, client)
                except Exception:  # a bug must not end the checks: the remote would never come back
                    log.exception('checking remote %s failed', remote.name)
                wait = remote.params.interval if remote.up else min(DOWN_RETRY_S, remote.params.interval)
                remote.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await remote.wake.wait()

    async def check(self, remote: Remote, client: httpx.AsyncClient) -> None:
        before = (remote.state, remote.error, _listing(remote))
        t0 = time.perf_counter()
        try:
            if remote.params.kind == 'node':
                found = await self._check_node(remote, client)
            else:
                found = await self._check_openai(remote, client)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            remote.state, remote.error = RemoteState.DOWN, _reason(e)
        else:
            # All at once, after the last await: a request never sees its models listed while it is not up yet.
            remote.models, remote.monitoring, remote.rpc = found
            remote.state, remote.error = RemoteState.UP, None
            remote.latency_ms = round((time.perf_counter() - t0) * 1000, 1)
        remote.checked_at = time.time()
        if (remote.state, remote.error, _listing(remote)) != before:
            if remote.state == RemoteState.DOWN:
                log.warning('remote %s is down: %s', remote.name, remote.error)
            else:
                log.info('remote %s is up: %d model(s)', remote.name, len(remote.models))
            self.bus.publish('remotes', 'changed', remote.as_dict())
        elif remote.params.kind == 'node':
            self.bus.publish('remotes', 'sampled', {'name': remote.name})

    async def _check_openai(self, remote: Remote, client: httpx.AsyncClient) -> _Found:
        r = await client.get(remote.params.base + '/v1/models', headers=remote.auth_headers())
        _raise_for(r)
        data = _object(r).get('data')
        if not isinstance(data, list):
            raise ValueError('its /v1/models answer has no "data" list')
        own = remote.params.models or [str(m['id']) for m in data if isinstance(m, dict) and m.get('id')]
        return _models(remote.params, {name: (None, {}, []) for name in own}), None, None

    async def _check_node(self, remote: Remote, client: httpx.AsyncClient) -> _Found:
        base = remote.params.base
        r = await client.get(base + '/api/models', headers=remote.auth_headers())
        _raise_for(r)
        listing = _object(r)
        rows = [_model_row(m) for m in listing.get('models') or [] if isinstance(m, dict)]
        rows = [m for m in rows if m['id'] and not m.get('error')]
        if remote.params.models is not None:
            rows = [m for m in rows if m['id'] in remote.params.models]
        models = _models(remote.params, {m['id']: (m['status'], m, m['aliases']) for m in rows})
        r = await client.get(base + '/api/monitoring', headers=remote.auth_headers())
        monitoring = _object(r) if r.status_code == 200 else None
        r = await client.get(base + '/api/rpc-server', headers=remote.auth_headers())
        return models, monitoring, _object(r) if r.status_code == 200 else None

    def mark_down(self, remote: Remote, error: str) -> None:
        """A request found it unreachable: down now, and checked again at once."""
        if remote.state != RemoteState.DOWN or remote.error != error:
            remote.state, remote.error = RemoteState.DOWN, error
            log.warning('remote %s is down: %s', remote.name, error)
            self.bus.publish('remotes', 'changed', remote.as_dict())
        remote.wake.set()

    def recheck(self, remote: Remote) -> None:
        remote.wake.set()

    # ---- a node's models -----------------------------------------------------------------------------------
    async def control(self, name: str, model: str, action: str) -> tuple[int, Any]:
        """Load or unload `model` (its id there) on node `name` through its own API: (status, its answer)."""
        remote = self._remotes.get(name)
        if remote is None:
            return 404, {'detail': {'message': f'no remote named {name!r}'}}
        if remote.params.kind != 'node':
            return 409, {'detail': {'message': f'{name} is an OpenAI server, not a node: its models are its own'}}
        if any(part in ('', '.', '..') for part in unquote(model).split('/')):
            return 404, {'detail': {'message': f'no model {model!r} on {name}'}}
        url = f'{remote.params.base}/api/models/{quote(model, safe="/")}/{action}'
        try:
            async with httpx.AsyncClient(
                verify=remote.tls or True,
                timeout=httpx.Timeout(CONTROL_TIMEOUT_S, connect=remote.params.connect_timeout),
                trust_env=False,
            ) as client:
                r = await client.post(url, headers=remote.auth_headers())
        except httpx.HTTPError as e:
            self.mark_down(remote, _reason(e))
            return 503, {'detail': {'message': f'node {name} is unreachable: {_reason(e)}'}}
        remote.wake.set()  # its model states changed: read them again now
        try:
            body = r.json()
        except ValueError:
            body = {'detail': {'message': r.text[:300]}}
        return r.status_code, body


# What a check found: models (listed id -> model), a node's monitoring sample and its RPC worker.
_Found = tuple[dict[str, 'RemoteModel'], dict[str, Any] | None, dict[str, Any] | None]
_Own = dict[str, tuple[str | None, dict[str, Any], list[str]]]  # own id -> (status, row, its own aliases)


def _models(params: RemoteParams, own: _Own) -> dict[str, RemoteModel]:
    """Listed id -> model: each own name (prefixed), its own aliases (prefixed) and the configured aliases."""
    out: dict[str, RemoteModel] = {}
    for own_id, (status, row, aliases) in own.items():
        for name in (own_id, *aliases):
            out.setdefault(params.listed_name(name), RemoteModel(params.listed_name(name), own_id, status, row))
    for alias, own_id in params.aliases.items():
        if own_id in own:
            status, row, _ = own[own_id]
            out[alias] = RemoteModel(alias, own_id, status, row)
    return out


def _object(r: httpx.Response) -> dict[str, Any]:
    data = r.json()
    if not isinstance(data, dict):
        raise ValueError(f'{r.request.url.path} did not answer a JSON object')
    return data


def _model_row(m: dict[str, Any]) -> dict[str, Any]:
    """A node's /api/models row, with the fields read here of the types used here (it is another machine's JSON)."""
    fit = _dict(m.get('fit'))
    return {
        **m,
        'id': m['id'] if isinstance(m.get('id'), str) else '',
        'status': m['status'] if isinstance(m.get('status'), str) else None,
        'aliases': _strings(m.get('aliases')),
        'fit': {k: v for k, v in fit.items() if k == 'label' or isinstance(v, int)},
        'size_bytes': m['size_bytes'] if isinstance(m.get('size_bytes'), int) else None,
        'mtime': m['mtime'] if isinstance(m.get('mtime'), (int, float)) else 0,
        'meta': _dict(m.get('meta')),
        'capabilities': _strings(m.get('capabilities')),
    }


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _listing(remote: Remote) -> tuple[tuple[str, str | None], ...]:
    return tuple((m.id, m.status) for m in remote.models.values())


def _raise_for(r: httpx.Response) -> None:
    if r.status_code in (401, 403):
        raise PermissionError(f'HTTP {r.status_code}: the api_key is missing or wrong')
    if r.status_code != 200:
        raise ValueError(f'HTTP {r.status_code} from {r.request.url.path}')


def _reason(e: BaseException) -> str:
    if isinstance(e, httpx.ConnectError):
        return f'cannot connect: {e}' if str(e) else 'cannot connect'
    if isinstance(e, httpx.TimeoutException):
        return 'timed out'
    return str(e) or type(e).__name__


def _tls_context(params: RemoteParams) -> ssl.SSLContext | None:
    if not params.tls:
        return None
    return ssl.create_default_context(cafile=params.ca_file) if params.ca_file else ssl.create_default_context()


def _row_summary(row: dict[str, Any]) -> dict[str, Any]:
    fit = row.get('fit') or {}
    return {
        'size_bytes': row.get('size_bytes'),
        'inflight': row.get('inflight'),
        'fit': fit.get('label'),
        'ram_needed_bytes': fit.get('ram_needed_bytes'),
        'vram_needed_bytes': fit.get('vram_needed_bytes'),
        'capabilities': row.get('capabilities') or [],
    }


def _rpc_summary(rpc: dict[str, Any] | None) -> dict[str, Any] | None:
    if not rpc:
        return None
    devices = (
        [d for d in rpc.get('devices') or [] if isinstance(d, dict)] if isinstance(rpc.get('devices'), list) else []
    )
    return {**{k: rpc.get(k) for k in ('status', 'endpoint', 'error')}, 'devices': devices}


def _monitoring_summary(sample: dict[str, Any] | None) -> dict[str, Any] | None:
    """A node's memory and live figures, from its latest sample."""
    if not sample:
        return None
    system, proxy, gpu = (_dict(sample.get(k)) for k in ('system', 'proxy', 'gpu'))
    return {
        'cpu_pct': system.get('cpu_pct'),
        'ram_used_bytes': system.get('ram_used_bytes'),
        'ram_total_bytes': system.get('ram_total_bytes'),
        'ram_available_bytes': system.get('ram_available_bytes'),
        'gpus': [
            {k: g.get(k) for k in ('name', 'memory_used_bytes', 'memory_total_bytes', 'memory_free_bytes')}
            for g in gpu.get('gpus') or []
            if isinstance(g, dict)
        ],
        'requests_per_s': proxy.get('requests_per_s'),
        'models_running': len(sample['models']) if isinstance(sample.get('models'), dict) else None,
    }
