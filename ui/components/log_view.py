"""A capped, coloured log view: one line per record with its time, level, source and model apart.

Capped (not virtual): `ui.log` keeps one element per line in the browser and on the server, so the view holds the
newest MAX_LINES and the Logs page says that the download has everything. New lines are pushed in batches."""

from __future__ import annotations

import time
from typing import Any

from nicegui import ui

MAX_LINES = 1000
LEVEL_CLASS = {
    'debug': 'text-gray-400',
    'info': '',
    'warning': 'text-amber-600',
    'error': 'text-red-600 font-semibold',
}


def line_text(d: dict[str, Any]) -> str:
    stamp = time.strftime('%H:%M:%S', time.localtime(d['ts'])) + f'.{int(d["ts"] % 1 * 1000):03d}'
    where = d['source'] if not d.get('model') else f'{d["source"]} · {d["model"]}'
    return f'{stamp} {d["level"].upper():7} [{where}] {d["message"]}'


class LogView:
    def __init__(self, height: str = 'h-[65vh]', max_lines: int = MAX_LINES, marker: str = 'log-view') -> None:
        self.max_lines = max_lines
        self.view = ui.log(max_lines=max_lines).classes(f'w-full {height} font-mono text-xs').mark(marker)
        self.pending: list[dict[str, Any]] = []
        self.paused = False

    def show(self, records: list[dict[str, Any]]) -> None:
        """Replace what is shown."""
        self.view.clear()
        self.pending.clear()
        self._push(records)

    def add(self, record: dict[str, Any]) -> None:
        """Queue a new line; `flush()` pushes the queue (unless paused: lines wait, up to the cap)."""
        self.pending.append(record)
        if len(self.pending) > self.max_lines:
            del self.pending[: len(self.pending) - self.max_lines]

    def flush(self) -> None:
        if self.pending and not self.paused:
            records, self.pending = self.pending, []
            self._push(records)

    def clear(self) -> None:
        self.view.clear()

    def _push(self, records: list[dict[str, Any]]) -> None:
        for d in records[-self.max_lines :]:
            self.view.push(line_text(d), classes=LEVEL_CLASS.get(d['level'], '') or None)
