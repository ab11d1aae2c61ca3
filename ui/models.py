"""Models: every GGUF found, what is inside it, whether it fits, and its live status with load/unload."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import ui

from ui.format import human_bytes, human_count
from ui.layout import page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

STATUS_COLOR = {
    'ready': 'positive',
    'starting': 'warning',
    'restarting': 'warning',
    'stopping': 'grey',
    'failed': 'negative',
    'stopped': 'grey',
}
FIT_COLOR = {'fits': 'positive', 'tight': 'warning', 'does not fit': 'negative'}


def register(system: System) -> None:
    async def act(action: str, model_id: str) -> None:
        try:
            if action == 'load':
                ui.notify(f'Loading {model_id}…')
                await system.scheduler.load(model_id)
                ui.notify(f'{model_id} is ready', type='positive')
            else:
                await system.scheduler.unload(model_id)
                ui.notify(f'{model_id} stopped')
        except Exception as e:  # shown to the user; the scheduler has logged the details
            ui.notify(f'{action} {model_id} failed: {e}', type='negative', multi_line=True)

    def model_card(entry: Any) -> None:
        live = system.scheduler.describe(entry.id)
        status = live.get('status', 'stopped')
        meta = entry.meta
        with ui.card().classes('w-full').mark(f'model-{entry.id}'):
            with ui.row().classes('items-center gap-3 w-full'):
                ui.label(entry.id).classes('text-lg font-medium')
                ui.badge(status, color=STATUS_COLOR.get(status, 'grey')).mark(f'status-{entry.id}')
                if entry.error:
                    ui.badge('unusable', color='negative')
                ui.space()
                busy = status in ('starting', 'stopping', 'restarting')
                if status in ('ready', 'starting', 'restarting'):
                    ui.button('Unload', on_click=lambda e=entry: act('unload', e.id)).props('outline').mark(
                        f'unload-{entry.id}'
                    )
                elif not entry.error:
                    load = ui.button('Load', on_click=lambda e=entry: act('load', e.id)).mark(f'load-{entry.id}')
                    load.set_enabled(not busy)
            if entry.error:
                ui.label(entry.error).classes('text-red-700 text-sm')
                return
            facts = [
                ('Architecture', meta.architecture or '—'),
                ('Parameters', human_count(meta.n_params)),
                ('Quantization', meta.file_type or '—'),
                ('Size', human_bytes(entry.size_bytes)),
                ('Context', str(meta.context_length or '—')),
                ('Layers', str(meta.block_count or '—')),
                ('Capabilities', ', '.join(entry.capabilities) or '—'),
            ]
            with ui.row().classes('gap-6 text-sm'):
                for label, value in facts:
                    with ui.column().classes('gap-0'):
                        ui.label(label).classes('text-gray-500 text-xs')
                        ui.label(value)
            fit = system.library.fit(entry)
            with ui.row().classes('items-center gap-2 text-sm'):
                ui.badge(fit.label, color=FIT_COLOR.get(fit.label, 'grey')).mark(f'fit-{entry.id}')
                ui.label(
                    f'needs {human_bytes(fit.ram_needed_bytes)} RAM (free {human_bytes(fit.ram_free_bytes)})'
                    + (f', {human_bytes(fit.vram_needed_bytes)} VRAM' if fit.vram_needed_bytes else '')
                    + f' at ctx {fit.ctx_size}'
                ).classes('text-gray-600')
            if status in ('ready', 'starting') and live.get('port'):
                ui.label(
                    f'pid {live.get("pid")} · port {live.get("port")} · in flight {live.get("inflight", 0)}'
                    f' · restarts {live.get("restarts", 0)}'
                ).classes('text-xs text-gray-500 font-mono')
            if live.get('error'):
                ui.label(str(live['error'])).classes('text-xs text-red-700 whitespace-pre-wrap')
            ui.label(str(entry.path)).classes('text-xs text-gray-400 font-mono break-all')

    @page(system, '/models', 'Models')
    def models_page() -> None:

        @ui.refreshable
        def listing() -> None:
            found = system.library.models()
            if not found:
                dirs = ', '.join(str(d) for d in system.config.settings.models_dirs)
                ui.label(
                    f'No GGUF models found in {dirs}.' if dirs else 'No model folders yet: add one in Settings.'
                ).classes('text-gray-600')
            for entry in found:
                model_card(entry)

        with ui.row().classes('items-center gap-2'):
            ui.button('Rescan', icon='refresh', on_click=lambda: system.library.rescan()).props('outline')
            ui.button('Unload all', on_click=lambda: system.scheduler.unload_all()).props('outline')
        listing()
        dirty = {'flag': False}

        def on_models(event: Event) -> None:
            dirty['flag'] = True

        def refresh() -> None:
            if dirty['flag']:
                dirty['flag'] = False
                listing.refresh()

        subscribe(system, ['models'], on_models)
        ui.timer(0.3, refresh)  # coalesce bursts of state events into one redraw
