"""The config file, watched: an edit by hand is applied like a save through the API; an invalid one keeps the
settings in force, and the error (field, message, file) is logged, published as a `config` event and kept for
`GET /api/config`. The app never rewrites the file for it: only the user's next save does.

watchfiles (inotify) on the file's folder, filtered to its name, debounced: an editor's burst of writes, or a
rename over the file, applies once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchfiles import Change, awatch

from core.settings import ConfigInvalid

if TYPE_CHECKING:
    from core.events import EventBus
    from core.settings import SettingsManager

log = logging.getLogger(__name__)

DEBOUNCE_MS = 300


class ConfigWatcher:
    def __init__(self, config: SettingsManager, apply: Callable[[], Awaitable[Any]], bus: EventBus) -> None:
        self.config, self._apply, self.bus = config, apply, bus
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    async def start(self) -> None:
        path = self.config.config_path
        if not path.parent.is_dir():
            log.info('not watching %s: its folder does not exist', path)
            return
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(path, self._stop), name='config-watch')
        await asyncio.sleep(0)  # let awatch set up its watch

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = self._stop = None

    async def _run(self, path: Path, stop: asyncio.Event) -> None:
        def is_config(_: Change, changed: str) -> bool:
            return Path(changed).name == path.name

        try:
            async for _changes in awatch(
                path.parent, watch_filter=is_config, debounce=DEBOUNCE_MS, step=50, stop_event=stop, recursive=False
            ):
                await self.reload()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception('watching %s stopped', path)

    async def reload(self) -> list[str]:
        """Take the file as it is now (see `SettingsManager.reload_file`); returns the fields that changed."""
        path = self.config.config_path
        try:
            changed = await asyncio.to_thread(self.config.reload_file)
        except ConfigInvalid as e:
            for err in e.errors:
                log.error('config file %s: %s: %s (the configuration in force is kept)', path, err.field, err.message)
            self.bus.publish('config', 'invalid', {'file': str(path), 'errors': [err.as_dict() for err in e.errors]})
            return []
        if changed:
            log.info('config file %s edited: %s', path, ', '.join(changed))
            await self._apply()
        return changed
