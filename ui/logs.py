from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from ui.layout import frame, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.logs import LogRecord
    from core.system import System

BATCH_SECONDS = 0.25  # push new lines to the browser in small batches, not one websocket message per line


def _fmt(rec: dict | LogRecord) -> str:
    d = rec if isinstance(rec, dict) else rec.as_dict()
    where = d['model'] or d['source']
    return f'{d["level"].upper():7} [{where}] {d["message"]}'


def register(system: System) -> None:
    @ui.page('/logs')
    def logs() -> None:
        with frame(system, 'Logs'):
            ui.label('The app and every llama-server it runs, newest at the bottom.').classes('text-gray-600')
            view = ui.log(max_lines=2000).classes('w-full h-[70vh] font-mono text-xs').mark('log-view')
            for rec in system.logs.query(limit=500):
                view.push(_fmt(rec))
            pending: list[str] = []

            def on_line(event: Event) -> None:
                pending.append(_fmt(event.data))

            def flush() -> None:
                if pending:
                    view.push('\n'.join(pending))
                    pending.clear()

            subscribe(system, ['logs'], on_line)
            ui.timer(BATCH_SECONDS, flush)
