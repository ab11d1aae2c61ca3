"""Settings: every field with its current value and where it came from; saved through the same core call as
`PUT /api/config`, so the same validation and atomic write apply."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nicegui import ui

from core.settings import ConfigInvalid, Settings
from ui.layout import page

if TYPE_CHECKING:
    from core.system import System

SKIP = {'api_keys', 'defaults', 'models'}  # edited elsewhere (keys are never shown back; model params on Models)


def _to_text(value: Any) -> str:
    if isinstance(value, list):
        return '\n'.join(str(v) for v in value)
    return '' if value is None else str(value)


def _from_text(name: str, text: str) -> Any:
    annotation = str(Settings.model_fields[name].annotation)
    if 'list' in annotation:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if text.strip() == '' and 'None' in annotation:
        return None
    return text


def register(system: System) -> None:
    @page(system, '/settings', 'Settings')
    def settings_page() -> None:
        desc = system.config.describe()
        ui.label(f'Saved to {desc["config_path"]}').classes('text-gray-600 text-sm')
        for w in desc['warnings']:
            ui.label(f'Ignored {w["field"]} from {w["source"]}: {w["message"]}').classes('text-red-700')
        inputs: dict[str, Any] = {}
        with ui.card().classes('w-full max-w-3xl'):
            for name, field in Settings.model_fields.items():
                if name in SKIP:
                    continue
                value = desc['settings'][name]
                source = desc['sources'][name]
                hint = f'{field.description or ""} (from {source})'
                local = name in desc['local_fields']
                if local:
                    hint += '; set it in the config file, the environment or on the command line'
                if isinstance(value, bool):
                    element: Any = ui.switch(name, value=value).tooltip(hint)
                elif isinstance(value, list):
                    element = ui.textarea(name, value=_to_text(value)).props('autogrow').classes('w-full')
                else:
                    element = ui.input(name, value=_to_text(value)).classes('w-full')
                if local:
                    element.props('readonly')  # not changed from a page (core/settings.py LOCAL_ONLY_FIELDS)
                else:
                    inputs[name] = element
                element.mark(f'setting-{name}')
                ui.label(hint).classes('text-xs text-gray-500 -mt-2')
        status = ui.label().classes('text-sm')

        async def save() -> None:
            current = system.config.describe()['settings']
            patch: dict[str, Any] = {}
            for name, element in inputs.items():
                value = element.value if isinstance(element.value, bool) else _from_text(name, element.value)
                if json.dumps(value, default=str) != json.dumps(_normalise(current[name]), default=str):
                    patch[name] = value
            if not patch:
                status.set_text('Nothing changed.')
                return
            try:
                result, applied = await system.save_config(patch)
            except ConfigInvalid as e:
                msg = '; '.join(f'{err.field}: {err.message}' for err in e.errors)
                status.set_text(f'Not saved. {msg}')
                status.classes(replace='text-sm text-red-700')
                ui.notify(f'Not saved: {msg}', type='negative')
                return
            text = f'Saved {", ".join(sorted(patch))}.'
            if applied['restarting']:
                text += f' Restarting {", ".join(applied["restarting"])} with the new values.'
            if result.restart_required:
                text += f' Restart the app to apply {", ".join(result.restart_required)}.'
            status.set_text(text)
            status.classes(replace='text-sm text-green-700')
            ui.notify(text, type='positive')

        ui.button('Save', on_click=save).mark('save-settings')


def _normalise(value: Any) -> Any:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value
