"""The config file, watched: an edit by hand is applied like a save through the API; an invalid one keeps the
settings in force, and the error (field, message, file) is logged, published as a `config` event and kept for
`GET /api/config`. The app never rewrites the file for it: only the user's next save does.

watchfiles (inotify) on the file's folder, filtered to its name, debounced: an editor's burst of writes, or a
rename over the file, applies once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchfiles import Change

from core.library.watch import FolderWatcher
from core.settings import ConfigInvalid

if TYPE_CHECKING:
    from core.events import EventBus
    from core.settings import SettingsManager

log = logging.getLogger(__name__)

DEBOUNCE_MS = 300


class ConfigWatcher:
    def __init__(self, config: SettingsManager, apply: Callable[[], Awaitable[Any]], bus: EventBus) -> None:
        self.config, self._apply, self.bus = config, apply, bus
        name = config.config_path.name

        def is_config(_: Change, changed: str) -> bool:
            return Path(changed).name == name

        self._watcher = FolderWatcher(self._changed, is_config, recursive=False, debounce_ms=DEBOUNCE_MS)

    async def start(self) -> None:
        path = self.config.config_path
        if not path.parent.is_dir():
            log.info('not watching %s: its folder does not exist', path)
            return
        await self._watcher.start([path.parent])

    async def stop(self) -> None:
        await self._watcher.stop()

    async def _changed(self, _paths: set[str]) -> None:
        await self.reload()

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
