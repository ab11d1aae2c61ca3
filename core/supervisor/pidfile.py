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
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

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

    def add(self, pid: int, model: str) -> None:
        created = start_time(pid)
        if created is None:
            return  # already gone
        with self._lock:
            data = self._read()
            data[str(pid)] = {'start_time': created, 'model': model}
            self._write(data)

    def remove(self, pid: int) -> None:
        with self._lock:
            data = self._read()
            if data.pop(str(pid), None) is not None:
                self._write(data)

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
                    log.warning('reaping llama-server pid %s (%s) left by an earlier run', pid, info.get('model'))
                    _kill_group(pid)
                    killed.append(proc)
                except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            psutil.wait_procs(killed, timeout=timeout)
            self._write({})
            return [p.pid for p in killed]


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
