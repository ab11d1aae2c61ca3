from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from ui.layout import coming, frame

if TYPE_CHECKING:
    from core.system import System


def register(system: System) -> None:
    @ui.page('/models')
    def models() -> None:
        with frame(system, 'Models'):
            found = system.library.models()
            if not found:
                dirs = ', '.join(str(d) for d in system.config.settings.models_dirs)
                ui.label(
                    f'No GGUF models found in {dirs}.' if dirs else 'No model folders yet: add one in Settings.'
                ).classes('text-gray-600')
            coming(
                'Every GGUF model found in your folders and caches, with its architecture, size, quantization, '
                'context length, memory-fit estimate and live status, and buttons to load and unload it.'
            )
