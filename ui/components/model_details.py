"""The details dialog of one model: running figures, the typed parameter editor, the exact command line, every GGUF
key/value, the chat template and the model's live log. One dialog per page, filled for the model it opens on."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from core import parameters
from core.settings import ConfigInvalid
from core.supervisor import ModelState, SupervisorError
from ui.components.log_view import LogView
from ui.components.param_editor import ParamEditor
from ui.format import DASH, human_bytes, uptime
from ui.layout import notify, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

LOG_TAIL = 200
META_COLUMNS: list[dict[str, Any]] = [
    {'name': 'key', 'label': 'Key', 'field': 'key', 'align': 'left', 'sortable': True},
    {'name': 'value', 'label': 'Value', 'field': 'value', 'align': 'left', 'style': 'white-space: normal'},
]


def _value_text(value: Any) -> str:
    if isinstance(value, dict) and 'length' in value:
        kind = value.get('array') or value.get('string') or 'value'
        return f'[{kind} × {value["length"]}]'
    text = str(value)
    return text if len(text) <= 300 else text[:300] + '…'


class ModelDetails:
    def __init__(self, system: System) -> None:
        self.system = system
        self.model_id: str | None = None
        self.log: LogView | None = None
        self.running: ui.label | None = None
        self.command: ui.column | None = None
        self.editor: ParamEditor | None = None
        with ui.dialog().props('full-width') as self.dialog, ui.card().classes('w-full max-w-6xl mx-auto'):
            self.body = ui.column().classes('w-full gap-2').mark('model-details')
        self.dialog.on('hide', self._closed)
        subscribe(system, ['logs'], self._on_log)

    def _closed(self) -> None:
        self.model_id = None
        self.log = None

    def _on_log(self, event: Event) -> None:
        if self.log is not None and event.data.get('model') == self.model_id:
            self.log.add(event.data)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()

    async def open(self, model_id: str) -> None:
        entry = self.system.library.get(model_id)
        if entry is None:
            return
        self.model_id = entry.id
        self.body.clear()
        with self.body:
            with ui.row().classes('items-center w-full'):
                ui.label(entry.id).classes('text-xl font-semibold break-all')
                ui.space()
                ui.button(icon='close', on_click=self.dialog.close).props('flat round dense').mark('details-close')
            if entry.error:  # an unusable file has nothing else to show
                ui.label(entry.error).classes('text-red-600')
                self.dialog.open()
                return
            self.running = ui.label().classes('text-sm font-mono lap-muted').mark('details-running')
            self.figures()
            with ui.tabs().classes('w-full').props('dense align=left outside-arrows mobile-arrows') as tabs:
                t_params = ui.tab('Parameters')
                t_cmd = ui.tab('Command line').mark('tab-command')
                t_meta = ui.tab('Metadata').mark('tab-metadata')
                t_tpl = ui.tab('Chat template')
                t_log = ui.tab('Log').mark('tab-log')
            with ui.tab_panels(tabs, value=t_params, animated=False).classes('w-full'):
                with ui.tab_panel(t_params):
                    self._parameters(entry.id)
                with ui.tab_panel(t_cmd):
                    self.command = ui.column().classes('w-full').mark('details-command')
                with ui.tab_panel(t_meta):
                    self._metadata(entry.kv)
                with ui.tab_panel(t_tpl):
                    tpl = entry.chat_template
                    if tpl:
                        ui.code(tpl, language='jinja').classes('w-full text-xs').mark('details-template')
                    else:
                        ui.label('This GGUF has no chat template.').classes('lap-muted')
                with ui.tab_panel(t_log):
                    self.log = LogView(height='h-[50vh]', max_lines=LOG_TAIL, marker='details-log')
                    self.log.show(
                        [r.as_dict() for r in self.system.logs.query(model=entry.id, limit=LOG_TAIL, level='debug')]
                    )
        self.dialog.open()
        await self.show_command()

    def figures(self, sample: dict[str, Any] | None = None) -> None:
        if self.running is None or self.model_id is None:
            return
        live = self.system.scheduler.describe(self.model_id)
        m = ((sample or self.system.metrics.latest or {}).get('models') or {}).get(self.model_id) or {}
        parts = [f'status {live.get("status")}']
        if live.get('pid'):
            parts += [f'pid {live["pid"]}', f'port {live.get("port")}', f'uptime {uptime(live.get("uptime_s"))}']
            parts.append(f'slots {live.get("slots") or DASH}')
            parts.append(f'RSS {human_bytes(m.get("rss_bytes"))}')
            if m.get('vram_bytes'):
                parts.append(f'VRAM {human_bytes(m["vram_bytes"])}')
        self.running.set_text(' · '.join(parts))

    def _parameters(self, model_id: str) -> None:
        view = parameters.model_view(self.system, model_id)
        inherited = view['defaults']
        ui.label(
            "Empty fields inherit the defaults (Settings) or llama-server's own. Saving restarts the running model "
            'only if its command line changes.'
        ).classes('text-sm lap-muted')
        self.editor = ParamEditor(view['params'], inherited, view['descriptions'])
        with ui.row().classes('gap-2'):
            ui.button('Save parameters', icon='save', on_click=lambda: self.save(model_id)).mark('params-save')
            ui.button('Reset to defaults', on_click=lambda: self.save(model_id, reset=True)).props('outline').mark(
                'params-reset'
            )

    async def save(self, model_id: str, reset: bool = False) -> None:
        client = context.client
        assert self.editor is not None
        editor = self.editor  # the dialog may open on another model while this saves
        body = {'request': None} if reset else editor.body()
        try:
            applied = await parameters.save_model(self.system, model_id, body)
        except KeyError:
            notify(client, f'{model_id} is gone (its file was removed)', type='warning')
            return
        except ConfigInvalid as e:
            first = editor.show_errors([(x.field, x.message) for x in e.errors])
            if first is not None:
                first.run_method('focus')
            message = '; '.join(f'{x.field}: {x.message}' for x in e.errors)
            notify(client, f'Not saved: {message}', type='negative', multi_line=True)
            return
        editor.clear_errors()
        text = 'Parameters saved.'
        if model_id in applied.get('restarting', []):
            text += ' The running server restarts with the new command line.'
        elif self.system.scheduler.describe(model_id).get('status') == ModelState.READY:
            text += ' The command line is unchanged: the running server keeps running.'
        notify(client, text, type='positive')
        if self.model_id != model_id:
            return
        if reset:
            await self.open(model_id)
        else:
            await self.show_command()

    async def show_command(self) -> None:
        if self.command is None or self.model_id is None:
            return
        box, model_id = self.command, self.model_id
        try:
            argv = await self.system.scheduler.command_line(model_id)
        except SupervisorError as e:
            text, ok = f'Cannot start with these parameters: {e}', False
        else:
            text, ok = shlex.join(argv), True
        if box.is_deleted or self.model_id != model_id:  # another model's details were opened meanwhile
            return
        box.clear()
        with box:
            if ok:
                ui.label('The port is picked free at each start (shown as 0); the key file holds a fresh key.').classes(
                    'text-sm lap-muted'
                )
                ui.code(text, language='bash').classes('w-full text-xs lap-wrap').mark('command-line')
            else:
                ui.label(text).classes('text-red-600').mark('command-line')

    def _metadata(self, kv: dict[str, Any]) -> None:
        rows = [{'key': k, 'value': _value_text(v)} for k, v in sorted(kv.items())]
        search = ui.input('Search keys and values').props('clearable dense').classes('w-72').mark('metadata-search')
        table = ui.table(columns=META_COLUMNS, rows=rows, row_key='key', pagination=25).classes('w-full')
        table.props('dense flat wrap-cells').mark('metadata-table')
        table.bind_filter_from(search, 'value')
