"""One model on the Models page: what the file is, whether it fits, its live state and the actions on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nicegui import ui

from core.supervisor import ModelState
from ui.format import DASH, human_bytes, human_count, uptime

if TYPE_CHECKING:
    from core.library import ModelEntry
    from core.library.fit import FitEstimate

STATE_COLOR: dict[str, str] = {
    ModelState.READY: 'positive',
    ModelState.STARTING: 'warning',
    ModelState.RESTARTING: 'warning',
    ModelState.STOPPING: 'grey',
    ModelState.FAILED: 'negative',
    ModelState.STOPPED: 'grey-7',
}
FIT_COLOR = {'fits': 'positive', 'tight': 'warning', 'does not fit': 'negative'}
UNUSABLE = 'unusable'
LOG_LINES_ON_FAILURE = 8


def shown_state(entry: ModelEntry, live: dict[str, Any]) -> str:
    """What the badge says: an unusable file is never "stopped", it cannot start at all."""
    return UNUSABLE if entry.error else str(live.get('status') or ModelState.STOPPED)


class ModelCard:
    """Built for one redraw; `figures(sample)` updates the running numbers from each metrics sample in place."""

    def __init__(
        self,
        entry: ModelEntry,
        live: dict[str, Any],
        fit: FitEstimate | None,
        *,
        pinned: bool,
        failure_log: list[str],
        on_action: Callable[[str, str], Any],
    ) -> None:
        self.entry = entry
        self.live = live
        self.running: ui.label | None = None  # the running figures line (not for an unusable file)
        mid = entry.id
        state = shown_state(entry, live)
        with ui.card().classes('w-full gap-2').mark(f'model-{mid}'):
            with ui.row().classes('items-center gap-2 w-full flex-wrap'):
                ui.label(mid).classes('text-lg font-medium break-all')
                ui.badge(state, color='negative' if state == UNUSABLE else STATE_COLOR.get(state, 'grey')).mark(
                    f'status-{mid}'
                )
                if pinned:
                    ui.icon('push_pin').classes('text-indigo-500').tooltip('Pinned: never evicted for another model')
                ui.space()
                if not entry.error:
                    self._actions(state, pinned, on_action)
            if entry.error:
                ui.label(entry.error).classes('text-red-600 text-sm').mark(f'error-{mid}')
                ui.label(str(entry.path)).classes('text-xs lap-muted font-mono break-all')
                return
            if state == ModelState.STARTING:
                progress = float(live.get('progress') or 0)
                with ui.row().classes('items-center gap-2 w-full'):
                    ui.linear_progress(value=progress, show_value=False).props('rounded size=8px').classes(
                        'flex-grow'
                    ).mark(f'progress-{mid}')
                    ui.label(f'loading {progress:.0%}').classes('text-xs lap-muted')
            if live.get('error'):
                with ui.column().classes('gap-1 w-full').mark(f'failure-{mid}'):
                    ui.label(str(live['error'])).classes('text-sm text-red-600 whitespace-pre-wrap break-all')
                    if failure_log:
                        # A label, not ui.code: each ui.code runs a server timer, and cards are redrawn often.
                        ui.label('\n'.join(failure_log[-LOG_LINES_ON_FAILURE:])).classes(
                            'w-full text-xs font-mono whitespace-pre-wrap break-all p-2 rounded bg-gray-500/10'
                        )
            self._facts(entry)
            if fit is not None:
                with ui.row().classes('items-center gap-2 text-sm flex-wrap'):
                    ui.badge(fit.label, color=FIT_COLOR.get(fit.label, 'grey')).mark(f'fit-{mid}')
                    vram = f', {human_bytes(fit.vram_needed_bytes)} VRAM' if fit.vram_needed_bytes else ''
                    ui.label(
                        f'needs {human_bytes(fit.ram_needed_bytes)} RAM (free {human_bytes(fit.ram_free_bytes)})'
                        f'{vram} at context {fit.ctx_size}'
                    ).classes('lap-muted')
            self.running = ui.label().classes('text-xs lap-muted font-mono').mark(f'running-{mid}')
            self.figures(None)
            ui.label(str(entry.path)).classes('text-xs lap-muted font-mono break-all')

    def _actions(self, state: str, pinned: bool, on_action: Callable[[str, str], Any]) -> None:
        mid = self.entry.id
        with ui.row().classes('items-center gap-1'):
            if state in (ModelState.READY, ModelState.STARTING, ModelState.RESTARTING):
                ui.button('Unload', icon='stop', on_click=lambda: on_action('unload', mid)).props('outline dense').mark(
                    f'unload-{mid}'
                )
            else:
                load = ui.button('Load', icon='play_arrow', on_click=lambda: on_action('load', mid)).props('dense')
                load.mark(f'load-{mid}').set_enabled(state != ModelState.STOPPING)
            ui.button(icon='push_pin', on_click=lambda: on_action('unpin' if pinned else 'pin', mid)).props(
                f'flat dense round {"color=primary" if pinned else "color=grey"}'
            ).tooltip('Unpin' if pinned else 'Pin: never evict for another model').mark(f'pin-{mid}').props(
                f'aria-pressed={str(pinned).lower()}'
            ).props['aria-label'] = f'{"Unpin" if pinned else "Pin"} {mid}'  # a dict item: a file name is not parsed
            ui.button('Details', icon='tune', on_click=lambda: on_action('details', mid)).props('flat dense').mark(
                f'details-{mid}'
            )

    @staticmethod
    def _facts(entry: ModelEntry) -> None:
        meta = entry.meta
        facts = [
            ('Architecture', meta.architecture or DASH),
            ('Parameters', human_count(meta.n_params)),
            ('Quantization', meta.file_type or DASH),
            ('Size', human_bytes(entry.size_bytes)),
            ('Context', str(meta.context_length or DASH)),
            ('Layers', str(meta.block_count or DASH)),
            ('Capabilities', ', '.join(entry.capabilities) or DASH),
        ]
        with ui.row().classes('gap-x-6 gap-y-1 text-sm flex-wrap'):
            for label, value in facts:
                with ui.column().classes('gap-0'):
                    ui.label(label).classes('lap-muted text-xs')
                    ui.label(value)

    def figures(self, sample: dict[str, Any] | None) -> None:
        """pid, port, uptime, slots, in flight, and the sampler's RSS/VRAM while the model runs."""
        live = self.live
        if self.running is None:
            return
        if live.get('status') not in (ModelState.READY, ModelState.STARTING) or not live.get('port'):
            self.running.set_visibility(False)
            return
        parts = [f'pid {live.get("pid") or DASH}', f'port {live.get("port")}', f'up {uptime(live.get("uptime_s"))}']
        if live.get('slots'):
            parts.append(f'{live["slots"]} slots')
        parts.append(f'in flight {live.get("inflight", 0)}')
        m = ((sample or {}).get('models') or {}).get(self.entry.id) or {}
        if m.get('rss_bytes') is not None:
            parts.append(f'RSS {human_bytes(m["rss_bytes"])}')
        if m.get('vram_bytes'):
            parts.append(f'VRAM {human_bytes(m["vram_bytes"])}')
        if live.get('restarts'):
            parts.append(f'restarts {live["restarts"]}')
        self.running.set_text(' · '.join(parts))
        self.running.set_visibility(True)
