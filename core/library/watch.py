"""Watch model folders with watchfiles and call back (debounced) when a model file appears, changes or goes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from watchfiles import Change, awatch

log = logging.getLogger(__name__)

DEBOUNCE_MS = 400  # a copy in progress fires many events; one rescan after it settles is enough


def _is_model_file(change: Change, path: str) -> bool:
    return path.lower().endswith(('.gguf', '.bin'))


class FolderWatcher:
    """One background task around `watchfiles.awatch`; `restart(dirs)` when the folder list changes. By default it
    watches model files below the folders; `watch_filter` and `recursive` make it watch other things (the config
    file: core/config_watch.py)."""

    def __init__(
        self,
        on_change: Callable[[set[str]], Awaitable[None]],
        watch_filter: Callable[[Change, str], bool] = _is_model_file,
        recursive: bool = True,
        debounce_ms: int = DEBOUNCE_MS,
    ) -> None:
        self._on_change = on_change
        self._filter, self._recursive, self._debounce = watch_filter, recursive, debounce_ms
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.dirs: list[Path] = []

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, dirs: Sequence[Path]) -> None:
        await self.stop()
        self.dirs = [d for d in dirs if d.is_dir()]
        if not self.dirs:
            return
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(self.dirs, self._stop), name='library-watch')
        await asyncio.sleep(0)  # let awatch set up its inotify watches before the caller scans

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = self._stop = None

    async def _run(self, dirs: list[Path], stop: asyncio.Event) -> None:
        try:
            async for changes in awatch(
                *dirs,
                watch_filter=self._filter,
                debounce=self._debounce,
                step=50,
                stop_event=stop,
                recursive=self._recursive,
                ignore_permission_denied=True,
            ):
                paths = {p for _, p in changes}
                log.debug('changed: %s', sorted(paths))
                try:
                    await self._on_change(paths)
                except Exception:
                    log.exception('handling a change of %s failed', ', '.join(sorted(paths)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception('watching %s stopped', ', '.join(map(str, dirs)))
