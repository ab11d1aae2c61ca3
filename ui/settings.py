"""Settings: every field in a group, with a typed input, its description, where its value came from, and one Save
that sends only what changed through `System.save_config` (the path of `PUT /api/config`: the same validation,
atomic write and live apply). A refused save marks each bad field and writes nothing.

The grouping is data (`GROUPS`); a field no group names lands in "Other", so a new setting is never hidden.
"""

from __future__ import annotations

import asyncio
import functools
import json
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from nicegui import Client, context, ui
from pydantic.fields import FieldInfo

from core.settings import ENV_PREFIX, ConfigInvalid, FieldError, Settings
from ui.components.api_keys import ApiKeys
from ui.components.folder_list import FolderList
from ui.layout import fact, live, notify, page

if TYPE_CHECKING:
    from core.system import System


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    icon: str
    fields: tuple[str, ...]
    blurb: str = ''


GROUPS: tuple[Group, ...] = (
    Group(
        'server',
        'Server',
        'dns',
        ('host', 'port', 'ssl_certfile', 'ssl_keyfile', 'data_dir'),
        'Where the UI, the API and the proxy listen. These apply after the app restarts.',
    ),
    Group('models', 'Model folders', 'folder', ('models_dirs', 'scan_well_known_dirs'), 'Where GGUF models are found.'),
    Group('binary', 'llama-server binary', 'terminal', ('llama_server_path',)),
    Group('launch', 'Launch defaults', 'tune', ('defaults', 'models')),
    Group(
        'scheduler',
        'Scheduler',
        'schedule',
        (
            'concurrency_limit',
            'max_loaded_models',
            'memory_budget_mb',
            'preload',
            'load_timeout',
            'stop_timeout',
            'drain_timeout',
            'health_interval',
            'restart_backoff',
        ),
        'How many models run at once, when they swap, and how long each step may take.',
    ),
    Group(
        'proxy',
        'Proxy',
        'swap_horiz',
        ('send_loading_state', 'client_timeout', 'max_body_bytes', 'max_connections', 'requests_keep'),
    ),
    Group(
        'metrics',
        'Metrics and alerts',
        'monitor_heart',
        (
            'metrics_interval',
            'alert_ram_pct',
            'alert_gpu_memory_pct',
            'alert_gpu_temp_c',
            'alert_disk_free_gb',
            'alert_hysteresis_pct',
            'sse_heartbeat',
            'sse_queue_size',
        ),
    ),
    Group('logging', 'Logging', 'article', ('log_level', 'log_buffer_lines', 'log_file_max_bytes', 'log_file_backups')),
    Group(
        'remotes',
        'Other machines',
        'lan',
        ('remotes', 'rpc_server'),
        'OpenAI-compatible servers and other Llama Async Proxy nodes: a JSON list of {name, url, kind, api_key, '
        'models, prefix, aliases}. Their state is on the Nodes page.',
    ),
    Group('hub', 'Hugging Face', 'cloud_download', ('hf_endpoint', 'hf_token', 'download_dir', 'max_downloads')),
    Group(
        'security',
        'Security',
        'lock',
        ('api_keys', 'api_keys_file', 'rate_limit_per_minute', 'metrics_without_key', 'cors_origins', 'allowed_hosts'),
    ),
)
_GROUPED = {name for g in GROUPS for name in g.fields}
OTHER = Group('other', 'Other', 'more_horiz', tuple(n for n in Settings.model_fields if n not in _GROUPED))
ALL_GROUPS = (*GROUPS, OTHER) if OTHER.fields else GROUPS

LABELS = {
    'host': 'Host',
    'hf_endpoint': 'Hugging Face endpoint',
    'hf_token': 'Hugging Face token',
    'download_dir': 'Download folder',
    'max_downloads': 'Downloads at once',
    'port': 'Port',
    'data_dir': 'Data folder',
    'log_level': 'Log level',
    'api_keys': 'API keys',
    'api_keys_file': 'API keys file',
    'ssl_certfile': 'TLS certificate',
    'ssl_keyfile': 'TLS private key',
    'cors_origins': 'CORS origins',
    'rate_limit_per_minute': 'Rate limit per key',
    'metrics_without_key': 'Local /metrics without a key',
    'models_dirs': 'Model folders',
    'scan_well_known_dirs': 'Scan well-known caches',
    'llama_server_path': 'llama-server path',
    'max_loaded_models': 'Models loaded at once',
    'memory_budget_mb': 'Memory budget',
    'load_timeout': 'Load timeout',
    'stop_timeout': 'Stop timeout',
    'drain_timeout': 'Drain timeout',
    'health_interval': 'Health check interval',
    'preload': 'Preload at start',
    'restart_backoff': 'Restart backoff',
    'max_body_bytes': 'Largest request body',
    'client_timeout': 'Client timeout',
    'max_connections': 'Connections at once',
    'concurrency_limit': 'Concurrency limit',
    'send_loading_state': 'Stream loading progress',
    'requests_keep': 'Request history kept',
    'allowed_hosts': 'Allowed Host names',
    'metrics_interval': 'Sample interval',
    'log_buffer_lines': 'Lines kept in memory',
    'log_file_max_bytes': 'Log file size before rotating',
    'log_file_backups': 'Rotated files kept',
    'sse_heartbeat': 'Event stream heartbeat',
    'sse_queue_size': 'Event stream buffer',
    'alert_ram_pct': 'RAM alert',
    'alert_gpu_memory_pct': 'GPU memory alert',
    'alert_gpu_temp_c': 'GPU temperature alert',
    'alert_disk_free_gb': 'Low disk alert',
    'alert_hysteresis_pct': 'Alert hysteresis',
}
SUFFIX = {
    'load_timeout': 's',
    'stop_timeout': 's',
    'drain_timeout': 's',
    'health_interval': 's',
    'restart_backoff': 's',
    'client_timeout': 's',
    'metrics_interval': 's',
    'sse_heartbeat': 's',
    'memory_budget_mb': 'MiB',
    'max_body_bytes': 'bytes',
    'log_file_max_bytes': 'bytes',
    'requests_keep': 'rows',
    'log_buffer_lines': 'lines',
    'sse_queue_size': 'events',
    'rate_limit_per_minute': '/ min',
    'alert_ram_pct': '%',
    'alert_gpu_memory_pct': '%',
    'alert_hysteresis_pct': '%',
    'alert_gpu_temp_c': '°C',
    'alert_disk_free_gb': 'GB',
}
STEP = {'metrics_interval': 0.1, 'restart_backoff': 0.5}
CLI_FLAGS = {
    'host': '--host',
    'port': '--port',
    'models_dirs': '--models-dir',
    'log_level': '--log-level',
    'ssl_certfile': '--ssl-certfile',
    'ssl_keyfile': '--ssl-keyfile',
}
SOURCE_BADGE = {'env': 'from env', 'cli': 'from command line'}

Kind = Literal['bool', 'int', 'float', 'choice', 'list', 'text', 'complex']


def label_of(name: str) -> str:
    return LABELS.get(name) or name.replace('_', ' ').capitalize()


def env_name(name: str) -> str:
    return f'{ENV_PREFIX}{name.upper()}'


def _base(field: FieldInfo) -> tuple[Any, bool]:
    """The annotation without `| None`, and whether None is allowed."""
    ann = field.annotation
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return (args[0] if len(args) == 1 else ann), len(args) < len(get_args(ann))
    return ann, False


def kind_of(field: FieldInfo) -> Kind:
    base, _ = _base(field)
    if base is bool:
        return 'bool'
    if base is int:
        return 'int'
    if base is float:
        return 'float'
    if get_origin(base) is Literal:
        return 'choice'
    if get_origin(base) is list:
        return 'list'
    if base is str or getattr(base, '__name__', '') in ('Path', 'PosixPath', 'WindowsPath'):
        return 'text'
    return 'complex'


def bounds(field: FieldInfo) -> tuple[float | None, float | None]:
    """(min, max) for the number input from the field's ge/gt/le/lt; an exclusive limit is used as the limit and
    core's validation refuses the limit itself."""
    lo = next(
        (v for m in field.metadata for v in (getattr(m, 'ge', None), getattr(m, 'gt', None)) if v is not None), None
    )
    hi = next(
        (v for m in field.metadata for v in (getattr(m, 'le', None), getattr(m, 'lt', None)) if v is not None), None
    )
    return lo, hi


@functools.cache
def defaults() -> dict[str, Any]:
    return Settings().model_dump(mode='json')


def _short(value: Any) -> str:
    text = ', '.join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 80 else text[:77] + '…'


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, default=str, sort_keys=True) == json.dumps(b, default=str, sort_keys=True)


class BoundedNumber(ui.number):
    """`ui.number` whose min/max steer the arrows and the inline check but never rewrite what was typed on blur:
    a silently clamped value is one the user did not choose."""

    def sanitize(self) -> None:
        if not self.out_of_limits:
            super().sanitize()


def limits_check(lo: float | None, hi: float | None, optional: bool, field: FieldInfo) -> Callable[[Any], str | None]:
    """The inline message for a number, worded like core's so the mark reads the same before and after a save."""
    strict_lo = any(getattr(m, 'gt', None) is not None for m in field.metadata)
    strict_hi = any(getattr(m, 'lt', None) is not None for m in field.metadata)

    def check(value: Any) -> str | None:
        if value is None:
            return None if optional else 'A number is needed'
        if lo is not None and (value <= lo if strict_lo else value < lo):
            return f'Input should be greater than {"" if strict_lo else "or equal to "}{_num(lo)}'
        if hi is not None and (value >= hi if strict_hi else value > hi):
            return f'Input should be less than {"" if strict_hi else "or equal to "}{_num(hi)}'
        return None

    return check


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class FieldRow:
    """One setting on the page: its input, its badges, its error, and its value as a patch would carry it."""

    def __init__(self, name: str, value: Any, desc: dict[str, Any], on_edit: Callable[[], None]) -> None:
        self.name = name
        self.field = Settings.model_fields[name]
        self.kind: Kind = kind_of(self.field)
        self.local = name in desc['local_fields']
        self.restart = name in desc['restart_fields']
        self.baseline = value
        self.element: Any = None
        self.folders: FolderList | None = None
        help_text = self.field.description or ''
        if self.local:
            help_text += f'. Read-only here: set {name} in the config file or {env_name(name)}'
            if name in CLI_FLAGS:
                help_text += f' or {CLI_FLAGS[name]}'
        with ui.column().classes('w-full gap-1') as self.root:
            self._build(value, help_text)
            # Below the input, not beside it: beside, the badges would take the input's width on a phone.
            with ui.row().classes('w-full items-center gap-1') as self.badges:
                self.source = ui.badge(color='warning').props('outline').mark(f'source-{name}')
                if self.restart:
                    ui.badge('restart to apply', color='grey').props('outline').tooltip(
                        'Takes effect after the app restarts'
                    )
                self.override = ui.label().classes('text-xs text-warning').mark(f'override-{name}')
            self.error_label = ui.label().classes('text-xs text-negative')
            self.error_label.visible = False
        self.show_source(desc['sources'].get(name, 'default'), desc['settings'][name])
        if self.folders is not None:
            self.folders.on_change(on_edit)
        elif self.element is not None:
            self.element.on_value_change(lambda _e: (self._recheck(), on_edit()))

    def _build(self, value: Any, help_text: str) -> None:
        name, label, kind = self.name, label_of(self.name), self.kind
        if name == 'models_dirs':
            self.folders = FolderList(label, [str(v) for v in value], readonly=self.local, marker=f'setting-{name}')
            ui.label(help_text).classes('text-xs lap-muted')
            return
        if kind == 'bool':
            self.element = ui.switch(label, value=bool(value))
            ui.label(help_text).classes('text-xs lap-muted pl-12 -mt-2')
        elif kind in ('int', 'float'):
            lo, hi = bounds(self.field)
            _, optional = _base(self.field)
            self.element = BoundedNumber(
                label,
                value=value,
                min=lo,
                max=hi,
                step=STEP.get(name, 1),
                precision=0 if kind == 'int' else None,
                suffix=SUFFIX.get(name),
                placeholder='none' if optional else None,
                validation=limits_check(lo, hi, optional, self.field),
            ).classes('w-full')
        elif kind == 'choice':
            base, _ = _base(self.field)
            self.element = ui.select(list(get_args(base)), label=label, value=value).classes('w-full')
        elif kind == 'list':
            self.element = ui.input_chips(label, value=[str(v) for v in value], new_value_mode='add-unique')
            self.element.classes('w-full')
            help_text += ' (Enter adds one)'
        elif kind == 'text':
            self.element = ui.input(label, value='' if value is None else str(value)).classes('w-full')
        else:
            self.element = ui.input(label, value=json.dumps(value)).classes('w-full').props('readonly')
            help_text += '. Edit it in the config file'
        self.element.mark(f'setting-{name}')
        # Screen readers (and tests) also get the config key, the name the file, env and docs use.
        self.element.props['aria-label'] = f'{label} ({name})'
        if kind != 'bool':
            self.element.props['hint'] = help_text
            self.element.props['hide-bottom-space'] = True  # a long hint or error grows the field, not overlaps
        if self.local:
            self.element.props('readonly' if kind != 'bool' else 'disable')

    def _recheck(self) -> None:
        """An edit clears core's mark; a number shows its own limits check at once instead."""
        if isinstance(self.element, BoundedNumber):
            self.element.validate(return_result=False)
        else:
            self.set_error(None)

    @property
    def editable(self) -> bool:
        return not self.local and self.kind != 'complex'

    @property
    def html_id(self) -> str:
        return self.root.html_id

    def current(self) -> Any:
        """The input's value as the patch carries it (core validates; nothing is refused here)."""
        if self.folders is not None:
            return self.folders.value
        value = self.element.value
        if self.kind == 'int' and isinstance(value, float) and value.is_integer():
            return int(value)
        if self.kind == 'text':
            text = (value or '').strip()
            _, optional = _base(self.field)
            return None if optional and not text else text
        if self.kind == 'list':
            return list(value or [])
        return value

    @property
    def dirty(self) -> bool:
        return self.editable and not _same(self.current(), self.baseline)

    def set_value(self, value: Any) -> None:
        """Show a value saved elsewhere (another tab, the API, the file)."""
        self.baseline = value
        if self.folders is not None:
            self.folders.value = [str(v) for v in value]
        elif self.kind == 'text':
            self.element.value = '' if value is None else str(value)
        elif self.kind == 'list':
            self.element.value = [str(v) for v in value]
        elif self.kind == 'complex':
            self.element.value = json.dumps(value)
        else:
            self.element.value = value

    def show_source(self, source: str, in_force: Any) -> None:
        """The badge, and for a value set by env or CLI what is in force instead of the saved value shown."""
        text = SOURCE_BADGE.get(source, '')
        self.source.set_text(text)
        self.source.visible = bool(text)
        note = ''
        if text:
            where = env_name(self.name) if source == 'env' else CLI_FLAGS.get(self.name, 'a command line flag')
            note = f'In force: {_short(in_force)} from {where}.'
            if not self.local:
                note += ' A value saved here takes effect once that is unset.'
        self.override.set_text(note)
        self.override.visible = bool(note)
        self.badges.visible = bool(note) or self.restart

    def set_error(self, message: str | None) -> None:
        if self.folders is not None:
            self.folders.set_error(message)
        elif self.element is not None and self.kind != 'bool' and hasattr(self.element, 'error'):
            self.element.error = message
        else:
            self.error_label.set_text(message or '')
            self.error_label.visible = bool(message)

    @property
    def error(self) -> str | None:
        if self.element is not None and hasattr(self.element, 'error') and self.kind != 'bool':
            return str(self.element.error) if self.element.error else None
        return self.error_label.text or None


class SettingsForm:
    def __init__(self, system: System) -> None:
        self.system = system
        self.rows: dict[str, FieldRow] = {}
        self.keys: ApiKeys | None = None
        desc = system.config.describe()
        shown = self.shown(desc)
        ui.label(f'Saved to {desc["config_path"]}').classes('lap-muted text-sm font-mono break-all')
        jump = ui.row().classes('w-full items-center gap-x-4 gap-y-1')
        self.problems = ui.column().classes('w-full gap-1')
        self._show_problems(desc)
        with ui.grid().classes('w-full grid-cols-1 xl:grid-cols-2 gap-4 items-start pb-24'):
            cards = [(group, self._group(group, desc, shown)) for group in ALL_GROUPS]
        with jump:
            for group, card in cards:
                ui.link(group.title, card).classes('text-sm')
        with ui.page_sticky(position='bottom-right', x_offset=24, y_offset=24):
            with ui.card().classes('items-center gap-2 px-3 py-2 flex-row no-wrap shadow-lg'):
                self.status = ui.label().classes('text-sm max-w-md').mark('save-status')
                self.save_button = ui.button('Save', icon='save', on_click=self.save).mark('save-settings')
        self.edited()
        live(system, ['config'], self.sync)

    # ---- building ------------------------------------------------------------------------------------------
    def _group(self, group: Group, desc: dict[str, Any], shown: dict[str, Any]) -> ui.card:
        with ui.card().classes('w-full gap-3').mark(f'settings-{group.key}') as card:
            with ui.row().classes('items-center gap-2'):
                ui.icon(group.icon).classes('text-indigo-500 text-xl')
                ui.label(group.title).classes('text-lg font-semibold')
            if group.blurb:
                ui.label(group.blurb).classes('text-sm lap-muted -mt-2')
            for name in group.fields:
                if name == 'api_keys':
                    self.keys = ApiKeys(self.system, on_saved=self.sync)
                elif name in ('defaults', 'models'):
                    if name == 'defaults':
                        self._launch_defaults(desc)
                else:
                    self.rows[name] = FieldRow(name, shown[name], desc, self.edited)
                    if name == 'llama_server_path':
                        self._binary()
                    if name == 'ssl_keyfile':
                        tls = desc['settings']['ssl_certfile'] and desc['settings']['ssl_keyfile']
                        fact('Serving', 'HTTPS' if tls else 'HTTP (no TLS certificate set)')
        return card

    def _binary(self) -> None:
        binary = self.system.binary.current
        with ui.row().classes('w-full items-center gap-2 no-wrap'):
            self.binary_info = ui.label(self._binary_text(binary)).classes('text-sm grow break-all').mark('binary-info')
            self.test_button = ui.button('Test', icon='play_arrow', on_click=self.test_binary).props('outline')
            self.test_button.mark('test-binary').tooltip('Find llama-server again and ask its version')
        self.install_hint = ui.label(self.system.binary.how_to_install()).classes('text-sm text-warning')
        self.install_hint.mark('binary-hint')
        self.install_hint.visible = binary is None

    @staticmethod
    def _binary_text(binary: Any) -> str:
        if binary is None:
            return 'llama-server not found'
        return f'llama-server {binary.version} at {binary.path} (found via {binary.source})'

    def _launch_defaults(self, desc: dict[str, Any]) -> None:
        ui.markdown(
            'Launch parameters (context size, GPU layers, ttl, …) are set per model, typed and checked, on '
            '[the Models page](/models).'
        ).classes('text-sm')
        set_defaults = {k: v for k, v in (desc['settings'].get('defaults') or {}).items() if v is not None}
        if set_defaults:
            ui.label('For every model unless it sets its own (config file, "defaults"):').classes('text-sm lap-muted')
            for key, value in set_defaults.items():
                fact(key, json.dumps(value) if not isinstance(value, str) else value)
        else:
            ui.label("No global defaults: llama-server's own apply.").classes('text-sm lap-muted')
        per_model = len(desc['settings'].get('models') or {})
        ui.label(f'{per_model} model(s) have their own parameters.').classes('text-sm lap-muted').mark('launch-models')

    def _show_problems(self, desc: dict[str, Any]) -> None:
        self.problems.clear()
        with self.problems:
            for w in desc['file_errors']:
                ui.label(f'The config file on disk is not in force: {w["field"]}: {w["message"]}').classes(
                    'text-negative text-sm'
                )
            for w in desc['warnings']:
                if w['field'] == '(file)':  # the whole file: unreadable, and where the copy kept of it is
                    ui.label(f'Config file: {w["message"]}').classes('text-negative text-sm').mark('config-file-notice')
                    continue
                ui.label(f'Ignored {w["field"]} from {w["source"]}: {w["message"]}').classes('text-negative text-sm')

    # ---- state ---------------------------------------------------------------------------------------------
    def shown(self, desc: dict[str, Any]) -> dict[str, Any]:
        """What each input holds: the value in force, except where env or CLI set it; there the saved value (or
        the default), since that is what a save here changes."""
        saved = self.system.config.file_data()
        out = {}
        for name in Settings.model_fields:
            if desc['sources'].get(name) in SOURCE_BADGE and name not in desc['local_fields']:
                out[name] = saved.get(name, defaults().get(name))
            else:
                out[name] = desc['settings'][name]
        return out

    def dirty(self) -> dict[str, Any]:
        return {name: row.current() for name, row in self.rows.items() if row.dirty}

    def edited(self) -> None:
        count = len(self.dirty())
        if count:
            self.status.set_text(f'{count} unsaved change{"s" if count != 1 else ""}')
            self.status.classes(replace='text-sm max-w-md')
        elif 'unsaved' in self.status.text:  # a save's outcome stays until the next edit
            self.status.set_text('')

    def sync(self) -> None:
        """Catch up with the settings in force (saved here, in another tab, through the API or the file); a field
        the user is editing keeps what they typed."""
        desc = self.system.config.describe()
        shown = self.shown(desc)
        for name, row in self.rows.items():
            value = shown[name]
            if _same(row.current(), value):
                row.baseline = value  # what is typed is what is saved now (this save, or the same elsewhere)
            elif not row.dirty:
                row.set_value(value)  # changed elsewhere while untouched here
            row.show_source(desc['sources'].get(name, 'default'), desc['settings'][name])
        self._show_problems(desc)
        if self.keys is not None:
            self.keys.refresh()
        self.edited()

    # ---- actions -------------------------------------------------------------------------------------------
    async def test_binary(self) -> None:
        client = context.client
        self.test_button.props('loading')
        try:
            binary = await asyncio.to_thread(self.system.binary.recheck)
        finally:
            self.test_button.props(remove='loading')
        hint = self.system.binary.how_to_install()
        if not self.binary_info.is_deleted:
            self.binary_info.set_text(self._binary_text(binary))
            self.install_hint.set_text(hint)
            self.install_hint.visible = binary is None
        if binary is None:
            notify(client, f'llama-server not found. {hint}', type='negative', multi_line=True, timeout=10000)
        else:
            notify(client, f'llama-server {binary.version} works', type='positive')

    async def save(self) -> None:
        client = context.client
        patch = self.dirty()
        for row in self.rows.values():
            row.set_error(None)
        if self.keys is not None:
            self.keys.set_error(None)
        if not patch:
            notify(client, 'Nothing changed', type='info')
            return
        self.save_button.props('loading')
        try:
            result, applied = await self.system.save_config(patch)
        except ConfigInvalid as e:
            self._refused(client, e.errors, patch)
            return
        finally:
            self.save_button.props(remove='loading')
        text, warn = self._saved_text(patch, result, applied)
        if not client.is_deleted:
            with client:
                self.sync()
                self.status.set_text(text)
                self.status.classes(replace=f'text-sm max-w-md {"text-warning" if warn else "text-positive"}')
        notify(client, text, type='warning' if warn else 'positive', multi_line=True, timeout=8000)

    def _refused(self, client: Client, errors: list[FieldError], patch: dict[str, Any]) -> None:
        first: Any = None
        for err in errors:
            name = err.field.split('.')[0]
            targets: list[Any] = []
            if name in self.rows:
                targets.append(self.rows[name])
            if name == 'api_keys':
                if self.keys is not None:
                    targets.append(self.keys)
                if 'host' in patch:  # the host is what made keys necessary
                    targets.append(self.rows['host'])
            for target in targets:
                target.set_error(err.message)
                first = first or target
        text = '; '.join(f'{label_of(e.field.split(".")[0])}: {e.message}' for e in errors)
        if not client.is_deleted:
            with client:
                n = len({e.field for e in errors})
                self.status.set_text(f'Not saved: {n} field{"s" if n != 1 else ""} to fix')
                self.status.classes(replace='text-sm max-w-md text-negative')
                if first is not None:  # bring the first bad field into view; the others are marked too
                    ui.run_javascript(
                        f'document.getElementById("{first.html_id}")?.scrollIntoView({{block: "center"}})'
                    )
        notify(client, f'Not saved: {text}', type='negative', multi_line=True, timeout=10000)

    @staticmethod
    def _saved_text(patch: dict[str, Any], result: Any, applied: dict[str, list[str]]) -> tuple[str, bool]:
        parts = [f'Saved {", ".join(label_of(n) for n in patch)}.']
        warn = False
        if applied.get('restarting'):
            parts.append(f'Restarting {", ".join(applied["restarting"])} with the new values.')
        if applied.get('next_start'):
            parts.append(f'{", ".join(applied["next_start"])} use them at the next start.')
        if result.restart_required:
            parts.append(f'Restart the app to apply {", ".join(label_of(n) for n in result.restart_required)}.')
            warn = True
        for name, source in result.overridden.items():
            where = env_name(name) if source == 'env' else CLI_FLAGS.get(name, 'the command line')
            parts.append(f'{label_of(name)} is set by {where}: the saved value takes effect once that is unset.')
            warn = True
        return ' '.join(parts), warn


def register(system: System) -> None:
    @page(system, '/settings', 'Settings')
    def settings_page() -> None:
        SettingsForm(system)
