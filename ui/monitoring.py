from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from ui.layout import coming, frame

if TYPE_CHECKING:
    from core.system import System


def register(system: System) -> None:
    @ui.page('/monitoring')
    def monitoring() -> None:
        with frame(system, 'Monitoring'):
            coming(
                "Live charts of CPU, RAM, GPU utilization, memory and temperature, and each llama-server's "
                'prompt and generation tokens/s, sampled once a second, with the last hour, day and week.'
            )
