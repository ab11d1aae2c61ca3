"""A KPI card: a label, the measured value, an optional line under it."""

from __future__ import annotations

from nicegui import ui

from ui.format import DASH


class KpiCard:
    def __init__(self, label: str, marker: str, hint: str = '') -> None:
        with ui.card().classes('min-w-0 gap-0 p-3'):
            ui.label(label).classes('text-xs lap-muted')
            self.value = ui.label(DASH).classes('text-2xl font-semibold').mark(marker)
            self.hint = ui.label(hint).classes('text-xs lap-muted')
            self.hint.set_visibility(bool(hint))

    def set(self, value: str, hint: str | None = None) -> None:
        if self.value.text != value:
            self.value.set_text(value)
        if hint is not None and self.hint.text != hint:
            self.hint.set_text(hint)
            self.hint.set_visibility(bool(hint))
