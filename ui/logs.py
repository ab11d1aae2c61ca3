"""Logs: the app's own lines and every llama-server's, filtered by level, source, model and text, live."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import ui

from core.logs import LEVELS
from ui.layout import page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.logs import LogRecord
    from core.system import System

BATCH_SECONDS = 0.25  # push new lines to the browser in small batches, not one websocket message per line
ALL = 'all'


def _fmt(rec: dict[str, Any] | LogRecord) -> str:
    d = rec if isinstance(rec, dict) else rec.as_dict()
    where = d['model'] or d['source']
    return f'{d["level"].upper():7} [{where}] {d["message"]}'


def register(system: System) -> None:
    @page(system, '/logs', 'Logs')
    def logs() -> None:
        ui.label('The app and every llama-server it runs, newest at the bottom.').classes('text-gray-600')
        models = [ALL, *(e.id for e in system.library.models())]
        with ui.row().classes('items-end gap-4'):
            level = ui.select(list(LEVELS), value='info', label='Minimum level').classes('w-36').mark('log-level')
            source = ui.select([ALL, 'app', 'llama-server'], value=ALL, label='Source').classes('w-40')
            model = ui.select(models, value=ALL, label='Model').classes('w-56').mark('log-model')
            text = ui.input('Contains').props('clearable').classes('w-64').mark('log-search')
            for src in ('app', 'llama-server'):
                ui.link(f'Download {src} log', f'/api/logs/download?source={src}', new_tab=True).classes('text-sm')
        view = ui.log(max_lines=2000).classes('w-full h-[70vh] font-mono text-xs').mark('log-view')
        pending: list[str] = []

        def filters() -> dict[str, Any]:
            return {
                'level': level.value,
                'source': None if source.value == ALL else source.value,
                'model': None if model.value == ALL else model.value,
                'q': text.value or None,
            }

        def reload() -> None:
            view.clear()
            pending.clear()
            lines = [_fmt(r) for r in system.logs.query(limit=500, **filters())]
            if lines:
                view.push('\n'.join(lines))

        def matches(d: dict[str, Any]) -> bool:
            f = filters()
            return (
                LEVELS.index(d['level']) >= LEVELS.index(f['level'] or 'debug')
                and (f['source'] is None or d['source'] == f['source'])
                and (f['model'] is None or d['model'] == f['model'])
                and (f['q'] is None or f['q'].lower() in d['message'].lower())
            )

        def on_line(event: Event) -> None:
            if event.data.get('level') in LEVELS and matches(event.data):
                pending.append(_fmt(event.data))

        def flush() -> None:
            if pending:
                view.push('\n'.join(pending))
                pending.clear()

        for element in (level, source, model, text):
            element.on_value_change(reload)
        reload()
        subscribe(system, ['logs'], on_line)
        ui.timer(BATCH_SECONDS, flush)
