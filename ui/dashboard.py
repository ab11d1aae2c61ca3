from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from ui.layout import coming, fact, frame

if TYPE_CHECKING:
    from core.system import System


def register(system: System) -> None:
    @ui.page('/')
    def dashboard() -> None:
        with frame(system, 'Dashboard'):
            s = system.config.settings
            with ui.card().classes('w-full'):
                ui.label('This installation').classes('text-lg font-medium')
                fact('Version', system.version)
                b = system.binary.current
                if b is None:
                    fact('llama-server', 'not found')
                    ui.label(system.binary.how_to_install()).classes('text-sm text-red-700')
                else:
                    fact('llama-server', f'{b.version} — {b.path}')
                dirs = ', '.join(str(d) for d in s.models_dirs) or 'none configured (add one in Settings)'
                fact('Model folders', dirs)
                fact('Models found', str(len(system.library.models())))
                fact('OpenAI endpoint', f'http://{s.host}:{s.port}/v1')
            coming(
                'Live KPIs (loaded models, requests/s, tokens/s, CPU, RAM and GPU) and the recent-requests table '
                'appear here once the metrics sampler and the proxy are running.'
            )
