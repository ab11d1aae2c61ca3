"""Logs: the app's own lines and every llama-server's, filtered by level, source, model and text, live; pause to
read, follow to see new lines, clear the view, download the whole files."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from core.logs import LEVELS, file_name
from ui.components.log_view import MAX_LINES, LogView
from ui.layout import notify, page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

BATCH_SECONDS = 0.25  # push new lines to the browser in small batches, not one websocket message per line
ALL = 'all'


def matches(d: dict[str, Any], f: dict[str, Any]) -> bool:
    """The same filters as `LogService.query`, for lines as they arrive."""
    return (
        LEVELS.index(d['level']) >= LEVELS.index(f['level'] or 'debug')
        and (f['source'] is None or d['source'] == f['source'])
        and (f['model'] is None or d['model'] == f['model'])
        and (f['q'] is None or f['q'].lower() in d['message'].lower())
    )


def register(system: System) -> None:
    @page(system, '/logs', 'Logs')
    def logs() -> None:
        ui.label(
            f'The app and every llama-server it runs, newest at the bottom; the view keeps the last {MAX_LINES} lines '
            '(the download has everything).'
        ).classes('lap-muted text-sm')
        models = [ALL, *(e.id for e in system.library.models())]
        view: LogView  # built under the toolbar whose Clear button empties it
        with ui.row().classes('items-end gap-3 w-full flex-wrap'):
            level = ui.select(list(LEVELS), value='info', label='Minimum level').classes('w-32').mark('log-level')
            source = ui.select([ALL, 'app', 'llama-server'], value=ALL, label='Source').classes('w-36')
            source.mark('log-source')
            model = ui.select(models, value=ALL, label='Model').classes('w-48').mark('log-model')
            text = ui.input('Contains').props('clearable').classes('w-56').mark('log-search')
            follow = ui.switch('Follow', value=True).mark('log-follow').tooltip('Off: new lines wait until you follow')
            ui.button('Clear view', icon='clear_all', on_click=lambda: view.clear()).props('outline dense').mark(
                'log-clear'
            )
            with ui.button('Download', icon='download').props('outline dense'):
                with ui.menu():
                    for src in ('app', 'llama-server'):
                        ui.menu_item(f'{src} log', on_click=lambda s=src: download(s)).mark(f'log-download-{src}')
        waiting = ui.label().classes('text-sm text-amber-600').mark('log-waiting')
        view = LogView()

        async def download(src: str) -> None:
            client = context.client
            try:
                data = await asyncio.to_thread(system.logs.read_all, src)
            except OSError as e:
                notify(client, f'Cannot read the {src} log: {e}', type='negative')
                return
            if not client.is_deleted:
                with client:
                    ui.download(data, file_name(src), 'text/plain')

        def filters() -> dict[str, Any]:
            return {
                'level': level.value,
                'source': None if source.value == ALL else source.value,
                'model': None if model.value == ALL else model.value,
                'q': text.value or None,
            }

        def reload() -> None:
            view.show([r.as_dict() for r in system.logs.query(limit=MAX_LINES, **filters())])

        def on_line(event: Event) -> None:
            if event.data.get('level') in LEVELS and matches(event.data, filters()):
                view.add(event.data)

        def flush() -> None:
            view.paused = not follow.value
            view.flush()
            waiting.set_text(
                f'{len(view.pending)} new lines waiting: turn Follow on' if view.paused and view.pending else ''
            )

        for element in (level, source, model, text):
            element.on_value_change(reload)
        reload()
        subscribe(system, ['logs'], on_line)
        ui.timer(BATCH_SECONDS, flush)
