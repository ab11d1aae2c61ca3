"""What a person with no models yet sees on the dashboard and the Models page: the two ways in, getting one from
Hugging Face or making a demo model on the spot (no network needed). Hidden as soon as the library lists a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import context, ui

from ui.layout import Working, live

if TYPE_CHECKING:
    from core.system import System


class FirstRun:
    def __init__(self, system: System) -> None:
        self.system = system
        self.client = context.client
        with ui.card().classes('w-full gap-2').mark('first-run') as self.card:
            ui.label('No models yet').classes('text-lg font-semibold')
            ui.label(
                'Find a GGUF model on Hugging Face and download it, or make a tiny demo model right here (random '
                'weights: it talks nonsense, but every page can be tried with it, offline).'
            ).classes('lap-muted')
            with ui.row().classes('gap-2'):
                ui.button(
                    'Find one on Hugging Face', icon='cloud_download', on_click=lambda: ui.navigate.to('/downloads')
                ).mark('find-model')
                ui.button('Create a demo model', icon='science', on_click=self.demo).props('outline').mark('make-demo')
        self.update()
        live(system, ['models'], self.update, every_ms=300)

    def update(self) -> None:
        self.card.set_visibility(not any(not e.error for e in self.system.library.models()))

    async def demo(self) -> None:
        working = Working(self.client, 'Creating the demo model…')
        try:
            path = await self.system.create_demo_model()
        except Exception as e:  # a full or read-only disk: said, not raised into the page
            working.done(f'Could not create the demo model: {e}', type='negative')
            return
        working.done(f'Demo model created: {path.name}', type='positive')
