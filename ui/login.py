"""Asks for an API key once per browser when `api_keys` is set; the browser keeps a digest, never the key."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from nicegui import app, ui

from core.auth import digest_matches, key_digest, key_matches

if TYPE_CHECKING:
    from core.system import System

STORAGE_KEY = 'api_key_digest'
_LOCAL = re.compile(r'/(?![/\\])[\x21-\x7e]*')


def authorised(system: System) -> bool:
    keys = system.config.settings.api_keys
    return not keys or digest_matches(app.storage.user.get(STORAGE_KEY), keys)


def _local_path(target: str) -> bool:
    """A path on this server, never another site: browsers read `//evil` and `/\\evil` as hosts, and drop tabs and
    newlines first (`/<TAB>/evil`), so only printable ASCII without a backslash passes."""
    return bool(_LOCAL.fullmatch(target)) and '\\' not in target


def register(system: System) -> None:
    @ui.page('/login', title='Sign in · Llama Async Proxy')
    def login(next: str = '/') -> None:
        target = next if _local_path(next) else '/'
        theme = app.storage.user.get('theme')
        ui.dark_mode(theme if theme in (None, True, False) else None)  # as the pages: the browser's choice

        def submit() -> None:
            if key_matches(key.value, system.config.settings.api_keys):
                app.storage.user[STORAGE_KEY] = key_digest(key.value)
                ui.navigate.to(target)
            else:
                key.value = ''
                ui.notify('That key is not one of the configured api_keys', type='negative')

        ui.colors(primary='#4f46e5')
        with ui.card().classes('absolute-center w-[min(24rem,92vw)] gap-4'):
            ui.label('Llama Async Proxy').classes('text-xl font-semibold')
            ui.label('This server asks for an API key (the api_keys setting).').classes('text-gray-600')
            key = ui.input('API key', password=True, password_toggle_button=True).classes('w-full').mark('api-key')
            key.on('keydown.enter', submit)
            ui.button('Sign in', on_click=submit).classes('w-full').mark('sign-in')
