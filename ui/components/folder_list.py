"""An editable list of folders (the `models_dirs` setting): add, remove, and a mark on each one that does not exist.

The list is a value like any input's: the settings form reads `value` and saves it with the other fields. Whether
a folder exists is asked of core in a thread (a slow or hung network mount must not stall the page).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nicegui import background_tasks, context, ui

from core.fsutil import existing_dirs
from ui.layout import notify


class FolderList:
    def __init__(self, label: str, value: list[str], *, readonly: bool = False, marker: str = 'folders') -> None:
        self._value = list(value)
        self._exists: dict[str, bool] = {}
        self._listeners: list[Callable[[], Any]] = []
        self.readonly = readonly
        with ui.column().classes('w-full gap-1') as self.root:
            ui.label(label).classes('text-sm font-medium')
            self._rows = ui.column().classes('w-full gap-0').mark(marker)
            with ui.row().classes('w-full items-center gap-2 no-wrap') as self._adder:
                self._new = ui.input(placeholder='/path/to/models').classes('grow').props('dense').mark(f'{marker}-new')
                self._new.on('keydown.enter', self._add)
                ui.button('Add folder', icon='create_new_folder', on_click=self._add).props('flat dense').mark(
                    f'{marker}-add'
                )
            self._error = ui.label().classes('text-xs text-negative')
            self._error.visible = False
        self._adder.set_visibility(not readonly)
        self.marker = marker
        self._draw()
        if self._value:
            background_tasks.create(self.check(), name='check folders')

    @property
    def html_id(self) -> str:
        return self.root.html_id

    @property
    def value(self) -> list[str]:
        return list(self._value)

    @value.setter
    def value(self, paths: list[str]) -> None:
        self._value = list(paths)
        self._changed()

    def on_change(self, handler: Callable[[], Any]) -> None:
        self._listeners.append(handler)

    def set_error(self, message: str | None) -> None:
        self._error.set_text(message or '')
        self._error.visible = bool(message)

    async def check(self) -> None:
        """Look up which folders exist (in a thread) and redraw with the answer."""
        paths = self.value
        found = await asyncio.to_thread(existing_dirs, paths)
        self._exists.update(found)
        if not self.root.is_deleted:
            self._draw()

    def _changed(self) -> None:
        self._draw()
        for handler in self._listeners:
            handler()
        if any(p not in self._exists for p in self._value):
            background_tasks.create(self.check(), name='check folders')  # drawn as "checking" meanwhile

    def _draw(self) -> None:
        self._rows.clear()
        with self._rows:
            if not self._value:
                ui.label('No folders: only the well-known caches are scanned (if on).').classes('lap-muted text-sm')
            for i, path in enumerate(self._value):
                exists = self._exists.get(path)
                with ui.row().classes('w-full items-center gap-2 no-wrap py-0.5'):
                    if exists is None:
                        ui.spinner(size='1.2em')
                    elif exists:
                        ui.icon('folder', color='positive').tooltip('Found')
                    else:
                        ui.icon('folder_off', color='warning')
                    ui.label(path).classes('font-mono text-sm break-all grow').mark(f'{self.marker}-path')
                    if exists is False:
                        ui.badge('not found', color='warning').props('outline').mark(f'{self.marker}-missing').tooltip(
                            'Not a folder on this machine (yet): it is scanned once it exists'
                        )
                    if not self.readonly:
                        ui.button(icon='delete', on_click=lambda i=i: self._remove(i)).props(
                            'flat dense round size=sm'
                        ).mark(f'{self.marker}-remove-{i}').tooltip('Remove from the list')

    def _add(self) -> None:
        client = context.client
        path = (self._new.value or '').strip()
        if not path:
            return
        if path in self._value:
            notify(client, f'{path} is in the list already', type='warning')
            return
        self._new.value = ''
        self.value = [*self._value, path]

    def _remove(self, index: int) -> None:
        if 0 <= index < len(self._value):
            self.value = [p for i, p in enumerate(self._value) if i != index]
