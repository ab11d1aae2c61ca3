"""What the app's own process holds right now: memory, file descriptors, threads, children and what its data dir
takes on disk. The soak (`bench/soak.py`) records these every minute to show that none of them grows; a user can read
the same through `GET /api/health/runtime` when the app seems to get heavier."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import psutil


class GcClock:
    """The garbage collector's passes and the time they took (each one stops the loop), from `gc.callbacks`."""

    def __init__(self) -> None:
        self.passes = 0
        self.seconds = 0.0
        self._started = 0.0

    def install(self) -> None:
        if self._on_pass not in gc.callbacks:
            gc.callbacks.append(self._on_pass)

    def _on_pass(self, phase: str, _info: dict[str, int]) -> None:
        if phase == 'start':
            self._started = time.perf_counter()
        else:
            self.passes += 1
            self.seconds += time.perf_counter() - self._started


GC_CLOCK = GcClock()  # (one per process, as the collector is)


def process_figures(data_dir: Path) -> dict[str, Any]:
    """Blocking (a few /proc reads and a walk of the data dir): call from a thread."""
    me = psutil.Process()
    with me.oneshot():
        rss = me.memory_info().rss
        threads = me.num_threads()
        fds = me.num_fds() if hasattr(me, 'num_fds') else None
        children = [c for c in me.children(recursive=True) if _running(c)]
    return {
        'pid': me.pid,
        'rss_bytes': rss,
        'open_fds': fds,
        'threads': threads,
        'children': len(children),
        'disk_bytes': _sizes(data_dir),
    }


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _sizes(data_dir: Path) -> dict[str, int]:
    """Bytes per part of the data dir: the SQLite database, its write-ahead log (and index), the log files, the
    rest."""
    out = {'sqlite': 0, 'sqlite_wal': 0, 'logs': 0, 'other': 0}
    for folder, _dirs, files in os.walk(data_dir):
        for name in files:
            try:
                size = os.stat(os.path.join(folder, name)).st_size
            except OSError:  # gone between the listing and the stat (a rotation)
                continue
            if name == 'lap.sqlite3':
                part = 'sqlite'
            elif name.startswith('lap.sqlite3-'):
                part = 'sqlite_wal'
            else:
                part = 'logs' if Path(folder).name == 'logs' else 'other'
            out[part] += size
    return out
