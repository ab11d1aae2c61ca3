"""The header's live chips: llama-server, models loaded of found, CPU, RAM, GPU, and the connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from core.supervisor import ModelState
from ui.format import human_bytes, pct

if TYPE_CHECKING:
    from core.system import System


class Chip:
    def __init__(self, icon: str, marker: str, tooltip: str) -> None:
        with ui.row().classes(
            'items-center gap-1 px-2 py-0.5 rounded bg-white/15 text-sm whitespace-nowrap'
        ) as self.row:
            ui.icon(icon).classes('text-base')
            self.label = ui.label('—').mark(marker)
        self.row.tooltip(tooltip)

    def set(self, text: str) -> None:
        if self.label.text != text:
            self.label.set_text(text)


class Header:
    """Built inside the header row; `update()` reads only in-memory state (the sampler's latest sample)."""

    def __init__(self, system: System) -> None:
        self.system = system
        with ui.row().classes('items-center gap-2 flex-nowrap overflow-hidden min-w-0'):
            self.binary = ui.badge().props('outline').classes('text-white gt-xs').mark('binary-status')
            # A write to the data dir failing (a full disk): the proxy serves on, the history waits; say so.
            with ui.badge(color='negative').classes('text-white').mark('data-problems') as self.problems:
                ui.icon('warning').classes('mr-1')
                self.problems_text = ui.label('data dir not writable')
                self.problems_tip = ui.tooltip('')
            self.problems.set_visibility(False)
            self.models = Chip('storage', 'chip-models', 'Models loaded / usable models found')
            self.cpu = Chip('memory', 'chip-cpu', 'CPU, all cores')
            self.ram = Chip('developer_board', 'chip-ram', 'RAM in use')
            self.ram.row.classes('gt-xs')
            self.gpu = Chip('videogame_asset', 'chip-gpu', 'GPU utilization · memory')
            with ui.row().classes('items-center gap-1 lap-online').mark('connected'):
                ui.icon('wifi').classes('text-green-300').tooltip('Live: connected')
            with ui.row().classes('items-center gap-1 lap-offline'):
                ui.icon('wifi_off').classes('text-amber-300')
                ui.label('reconnecting…').classes('text-sm text-amber-200')
        self.update()

    def update(self) -> None:
        b = self.system.binary.current
        text = 'llama-server missing' if b is None else f'llama-server {b.version}'
        if self.binary.text != text:
            self.binary.set_text(text)
            self.binary.props(f'color={"negative" if b is None else "positive"}')
        problems = self.system.problems()
        self.problems.set_visibility(bool(problems))
        if problems and self.problems_tip.text != '; '.join(problems):
            self.problems_tip.set_text('; '.join(problems))
        found = [e for e in self.system.library.models() if not e.error]  # an unusable file never loads
        loaded = sum(1 for e in found if self.system.scheduler.describe(e.id).get('status') == ModelState.READY)
        self.models.set(f'{loaded} / {len(found)}')
        sample = self.system.metrics.latest or {}
        s = sample.get('system') or {}
        self.cpu.set(pct(s.get('cpu_pct')))
        self.ram.set(f'{human_bytes(s.get("ram_used_bytes"))} · {pct(s.get("ram_pct"))}' if s else '—')
        g = sample.get('gpu') or {}
        gpus = g.get('gpus') or []
        self.gpu.row.set_visibility(bool(g.get('available') and gpus))
        if gpus:
            self.gpu.set(' | '.join(f'{pct(x.get("utilization_pct"))} · {pct(x.get("memory_used_pct"))}' for x in gpus))
