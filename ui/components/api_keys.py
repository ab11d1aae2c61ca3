"""The API keys card: the saved keys masked, Add (generated or typed; shown once) and Remove, each saved at once
through `System.save_config`, the same validation as every other setting (core refuses to leave a non-loopback
host without a key).

A key is never shown again after its dialog closes: the list shows only its last characters, and rows are found
again by a digest, so a removal picks the right key even if the list changed meanwhile.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nicegui import app, context, ui

from core.auth import digest_matches, key_digest
from core.settings import ConfigInvalid
from ui.layout import notify
from ui.login import STORAGE_KEY

if TYPE_CHECKING:
    from core.system import System

MIN_KEY_LENGTH = 8
SOURCE_TEXT = {'env': 'the environment (LAP_API_KEYS)', 'cli': 'the command line'}


def mask(key: str) -> str:
    """Enough to tell keys apart, not enough to use one (a short key shows nothing of itself)."""
    return '•' * 8 + (key[-4:] if len(key) >= 16 else '')


def browser_digest() -> str | None:
    """The digest this browser signed in with; unknown outside a request (a redraw from a core event)."""
    try:
        return app.storage.user.get(STORAGE_KEY)
    except RuntimeError:
        return None


def new_key() -> str:
    return 'lap-' + secrets.token_urlsafe(24)


class ApiKeys:
    def __init__(self, system: System, on_saved: Callable[[], Any] | None = None) -> None:
        self.system = system
        self.on_saved = on_saved
        with ui.column().classes('w-full gap-1') as self.root:
            with ui.row().classes('w-full items-center gap-2'):
                ui.label('API keys').classes('text-sm font-medium')
                ui.space()
                ui.button('Add key', icon='key', on_click=self._open_add).props('flat dense').mark('add-api-key')
            ui.label(
                'Clients send one as "Authorization: Bearer <key>" or "x-api-key". With none, only this machine can '
                'connect (a non-loopback host is refused without one).'
            ).classes('text-xs lap-muted')
            self._list = ui.column().classes('w-full gap-0').mark('api-keys')
            self._error = ui.label().classes('text-xs text-negative')
            self._error.visible = False
        self.refresh()

    @property
    def html_id(self) -> str:
        return self.root.html_id

    def set_error(self, message: str | None) -> None:
        self._error.set_text(message or '')
        self._error.visible = bool(message)

    def _saved_keys(self) -> list[str]:
        """The config file's keys: the only ones this page can change (env, CLI and api_keys_file keys are not)."""
        return list(self.system.config.file_data(secrets=True).get('api_keys') or [])

    def refresh(self) -> None:
        config = self.system.config
        saved = self._saved_keys()
        source = config.sources.get('api_keys', 'default')
        in_force = config.settings.api_keys
        mine = browser_digest()
        self._list.clear()
        with self._list:
            if source in SOURCE_TEXT:
                ui.label(
                    f'{len(in_force)} key(s) from {SOURCE_TEXT[source]} are in force; the keys saved here take effect '
                    'once that is unset.'
                ).classes('text-sm text-warning').mark('api-keys-overridden')
            if not saved:
                ui.label('No key saved.').classes('lap-muted text-sm')
            for key in saved:
                digest = key_digest(key)
                with ui.row().classes('w-full items-center gap-2 no-wrap py-0.5').mark('api-key-row'):
                    ui.icon('vpn_key').classes('text-indigo-500')
                    ui.label(mask(key)).classes('font-mono text-sm grow')
                    if digest_matches(mine, [key]):
                        ui.badge('this browser', color='primary').props('outline').tooltip(
                            'This browser signed in with it'
                        )
                    ui.button(icon='delete', on_click=lambda d=digest: self._confirm_remove(d)).props(
                        'flat dense round size=sm'
                    ).mark('remove-api-key').tooltip('Remove this key')
            others = len(in_force) - (len(saved) if source in ('file', 'default') else 0)
            if source in ('file', 'default') and others > 0:
                ui.label(f'{others} more from api_keys_file (edit that file to change them).').classes(
                    'lap-muted text-sm'
                )

    # ---- add -----------------------------------------------------------------------------------------------
    def _open_add(self) -> None:
        with ui.dialog() as dialog, ui.card().classes('w-[28rem] max-w-full gap-3'):
            ui.label('Add an API key').classes('text-lg font-semibold')
            typed = ui.input('Key', placeholder='empty = generate a random one').classes('w-full').mark('new-api-key')
            with ui.row().classes('w-full justify-end gap-2'):
                ui.button('Cancel', on_click=dialog.close).props('flat')
                add = ui.button('Add', on_click=lambda: self._add(dialog, typed)).mark('confirm-api-key')
            typed.on('keydown.enter', lambda: add.run_method('click'))
        dialog.on_value_change(lambda e: None if e.value else dialog.delete())  # the key leaves with its dialog
        dialog.open()

    async def _add(self, dialog: ui.dialog, typed: ui.input) -> None:
        client = context.client
        key = (typed.value or '').strip() or new_key()
        saved = self._saved_keys()
        if any(c.isspace() for c in key) or len(key) < MIN_KEY_LENGTH:
            typed.error = f'At least {MIN_KEY_LENGTH} characters, no spaces'
            return
        if key in saved:
            typed.error = 'That key is saved already'
            return
        had_keys = bool(self.system.config.settings.api_keys)
        try:
            result, _ = await self.system.save_config({'api_keys': [*saved, key]})
        except ConfigInvalid as e:
            message = '; '.join(err.message for err in e.errors)
            if not typed.is_deleted:
                typed.error = message
            notify(client, f'Not saved: {message}', type='negative')
            return
        if not had_keys and not client.is_deleted:
            with client:  # this browser was let in without a key; keep it signed in now that one is needed
                app.storage.user[STORAGE_KEY] = key_digest(key)
        self._after_save(client)
        note = ' It is not in force while LAP_API_KEYS or the command line sets the keys.' if result.overridden else ''
        notify(client, f'API key added.{note}', type='warning' if note else 'positive')
        if not dialog.is_deleted:
            dialog.close()
        if not client.is_deleted:
            with client:
                self._show_once(key)

    def _show_once(self, key: str) -> None:
        # Persistent: a click beside it must not lose a key that is never shown again.
        with ui.dialog().props('persistent') as dialog, ui.card().classes('w-[28rem] max-w-full gap-3'):
            ui.label('Copy the new key now').classes('text-lg font-semibold')
            ui.label('It is not shown again: the page shows only its last characters from now on.').classes(
                'text-sm lap-muted'
            )
            ui.label(key).classes('font-mono break-all p-2 rounded bg-indigo-500/10 w-full').mark('new-key-value')
            with ui.row().classes('w-full justify-end gap-2'):
                ui.button('Copy', icon='content_copy', on_click=lambda: self._copy(key)).props('flat').mark(
                    'copy-api-key'
                )
                ui.button('Done', on_click=dialog.close).mark('close-api-key')
        dialog.on_value_change(lambda e: None if e.value else dialog.delete())
        dialog.open()

    @staticmethod
    def _copy(key: str) -> None:
        ui.clipboard.write(key)
        ui.notify('Copied', type='positive')

    # ---- remove --------------------------------------------------------------------------------------------
    def _confirm_remove(self, digest: str) -> None:
        key = next((k for k in self._saved_keys() if key_digest(k) == digest), None)
        if key is None:
            self.refresh()
            return
        mine = digest_matches(browser_digest(), [key])
        with ui.dialog() as dialog, ui.card().classes('w-[28rem] max-w-full gap-3'):
            ui.label(f'Remove key {mask(key)}?').classes('text-lg font-semibold')
            ui.label('Clients that send it are refused at once.').classes('text-sm')
            if mine:
                ui.label('This browser signed in with it: it will be asked for another key.').classes(
                    'text-sm text-warning'
                )
            with ui.row().classes('w-full justify-end gap-2'):
                ui.button('Cancel', on_click=dialog.close).props('flat')
                ui.button('Remove', color='negative', on_click=lambda: self._remove(dialog, digest)).mark(
                    'confirm-remove-key'
                )
        dialog.on_value_change(lambda e: None if e.value else dialog.delete())
        dialog.open()

    async def _remove(self, dialog: ui.dialog, digest: str) -> None:
        client = context.client
        dialog.close()
        kept = [k for k in self._saved_keys() if key_digest(k) != digest]
        try:
            await self.system.save_config({'api_keys': kept})
        except ConfigInvalid as e:
            message = '; '.join(err.message for err in e.errors)
            if not self.root.is_deleted:
                self.set_error(message)
            notify(client, f'Not removed: {message}', type='negative')
            return
        self._after_save(client)
        notify(client, 'API key removed.', type='positive')

    def _after_save(self, client: Any) -> None:
        if self.root.is_deleted or client.is_deleted:
            return
        with client:
            self.set_error(None)
            self.refresh()
            if self.on_saved:
                self.on_saved()
