"""A registry of the llama-server processes this app started (pid + start time) so a later run can reap them.

The start time makes reaping safe: a pid the kernel has since given to another process has a different start
time and is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from core.fsutil import atomic_write_text

log = logging.getLogger(__name__)

# psutil reports start times rounded to the clock tick; allow for that when comparing.
_START_TIME_TOLERANCE_S = 0.05


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class PidRegistry:
    """Kept in memory and written through to `path`. A failed write (a full or read-only disk) is logged once and
    never raised: the servers must still start and stop (a stop that raised left the scheduler wedged in
    `stopping`), and `retry` (each metrics sample) or the next change writes the whole registry again, so it catches up
    when space returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] | None = None  # this run's servers, read from the file once
        self.write_error: str | None = None  # why the file is behind, while it is

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding='utf-8'))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning('pid registry %s unreadable (%s); starting a new one', self.path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + '\n')

    def _current(self) -> dict[str, dict[str, Any]]:
        if self._data is None:
            self._data = self._read()
        return self._data

    def _save(self) -> None:
        try:
            self._write(self._current())
        except OSError as e:
            if self.write_error is None:
                log.warning(
                    'pid registry %s not written (%s): if the app dies now, the next start cannot reap its '
                    'llama-servers; it is written again at the next start or stop',
                    self.path,
                    e,
                )
            self.write_error = str(e)
            return
        if self.write_error is not None:
            log.info('pid registry %s written again', self.path)
            self.write_error = None

    def add(self, pid: int, model: str) -> None:
        created = start_time(pid)
        if created is None:
            return  # already gone
        with self._lock:
            self._current()[str(pid)] = {'start_time': created, 'model': model}
            self._save()

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._current().pop(str(pid), None) is not None or self.write_error is not None:
                self._save()

    def retry(self) -> None:
        """Write the registry again if the last write failed (called about once a second; blocking)."""
        with self._lock:
            if self.write_error is not None:
                self._save()

    def reap(self, timeout: float = 5.0) -> list[int]:
        """Kill every registered process that is still the one we started. Returns the pids killed."""
        with self._lock:
            data = self._read()
            killed: list[psutil.Process] = []
            for pid_s, info in data.items():
                try:
                    pid = int(pid_s)
                    proc = psutil.Process(pid)
                    if abs(proc.create_time() - float(info.get('start_time', 0))) > _START_TIME_TOLERANCE_S:
                        continue  # pid reused by an unrelated process
                    if proc.status() == psutil.STATUS_ZOMBIE:  # killed by the parent-death signal, not collected
                        _kill_group(pid)  # anything still in its group
                        continue
                    log.warning('reaping llama-server pid %s (%s) left by an earlier run', pid, info.get('model'))
                    _kill_group(pid)
                    killed.append(proc)
                except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            _wait_dead(killed, timeout)
            self._data = {}
            self._save()
            return [p.pid for p in killed]


def _wait_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Until each is gone or a zombie. Not `psutil.wait_procs`: they are not our children, so it waits for init
    to collect them, which took ~1.5 s here and may never happen under an init that does not reap."""
    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if _running(p)]
        if procs:
            time.sleep(0.02)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_group(pid: int) -> None:
    """SIGKILL the child's own process group (it is its session leader), else the process alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
