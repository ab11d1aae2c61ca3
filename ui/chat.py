from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from ui.layout import coming, frame

if TYPE_CHECKING:
    from core.system import System


def register(system: System) -> None:
    @ui.page('/chat')
    def chat() -> None:
        with frame(system, 'Chat'):
            coming(
                'A chat playground: pick a model, send messages through the proxy and watch the reply stream in, '
                'with tokens/s and time to first token for each answer.'
            )
