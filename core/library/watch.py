"""Watch model folders with watchfiles and call back (debounced) when a model file appears, changes or goes, or a
watched folder itself goes or comes (back)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from watchfiles import Change, awatch

log = logging.getLogger(__name__)

DEBOUNCE_MS = 400  # a copy in progress fires many events; one rescan after it settles is enough
# inotify cannot watch a folder that does not exist yet, and its watch ends with the folder (a deleted folder, an
# unmounted drive); a stat of each configured folder this often notices both, in a thread (a dead network mount
# may block a stat for long).
ROOT_CHECK_S = 2.0


def _is_model_file(change: Change, path: str) -> bool:
    return path.lower().endswith(('.gguf', '.bin'))


def _present(dirs: Sequence[Path]) -> dict[Path, tuple[int, int]]:
    """The folders of `dirs` that exist, with their identity (blocking: a stat each)."""
    found = {}
    for d in dirs:
        try:
            st = d.stat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found[d] = (st.st_dev, st.st_ino)
    return found


class FolderWatcher:
    """One background task around `watchfiles.awatch`; `start(dirs)` again when the folder list changes. By default
    it watches model files below the folders; `watch_filter` and `recursive` make it watch other things (the config
    file: core/config_watch.py). A folder of `dirs` that is missing, or goes, is checked for every `ROOT_CHECK_S`:
    when one comes or goes, the watch restarts on those that exist and `on_change` gets the folder's path."""

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
        self._roots_task: asyncio.Task[None] | None = None
        self._wanted: list[Path] = []
        self._watched: dict[Path, tuple[int, int]] = {}  # folder -> (device, inode) when its watch began
        self.dirs: list[Path] = []  # those of `_wanted` that exist and are watched
        self._wake = asyncio.Event()  # a watched folder was deleted: check now

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, dirs: Sequence[Path]) -> None:
        await self.stop()
        self._wanted = list(dirs)
        await self._watch(_present(self._wanted))
        if self._wanted:
            self._roots_task = asyncio.create_task(self._check_roots(), name='library-watch-roots')

    async def stop(self) -> None:
        if self._roots_task is not None:
            self._roots_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._roots_task
            self._roots_task = None
        await self._unwatch()

    async def _watch(self, present: dict[Path, tuple[int, int]]) -> None:
        self._watched = present
        self.dirs = list(present)
        if not present:
            return
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(self.dirs, self._stop), name='library-watch')
        await asyncio.sleep(0)  # let awatch set up its inotify watches before the caller scans

    async def _unwatch(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = self._stop = None
        self._watched, self.dirs = {}, []

    async def _check_roots(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ROOT_CHECK_S)
            self._wake.clear()
            try:
                present = await asyncio.to_thread(_present, self._wanted)
                if present == self._watched and list(present) == self.dirs and (self.running or not present):
                    continue
                # A folder deleted and made again at the same path is another inode: inotify's watch died with
                # the old one, so it counts as changed too.
                changed = {d for d in present.keys() | set(self.dirs) if present.get(d) != self._watched.get(d)}
                log.info(
                    'watched folders changed: %s',
                    ', '.join(f'{d} {"appeared" if d in present else "gone"}' for d in sorted(changed)) or 'restarting',
                )
                await self._unwatch()
                await self._watch(present)
                await self._on_change({str(d) for d in changed})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception('checking the watched folders failed')

    async def _run(self, dirs: list[Path], stop: asyncio.Event) -> None:
        roots = {str(d): d for d in dirs}

        def wanted(change: Change, path: str) -> bool:
            return path in roots or self._filter(change, path)

        try:
            async for changes in awatch(
                *dirs,
                watch_filter=wanted,
                debounce=self._debounce,
                step=50,
                stop_event=stop,
                recursive=self._recursive,
                ignore_permission_denied=True,
            ):
                paths = {p for _, p in changes}
                gone = {roots[p] for c, p in changes if p in roots and c == Change.deleted}
                if gone:
                    # Its watch ended with it; one at the same path later may even reuse the inode number.
                    for d in gone:
                        self._watched.pop(d, None)
                    self._wake.set()
                log.debug('changed: %s', sorted(paths))
                try:
                    await self._on_change(paths)
                except Exception:
                    log.exception('handling a change of %s failed', ', '.join(sorted(paths)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception('watching %s stopped', ', '.join(map(str, dirs)))
