"""What the next start does with the llama-servers an earlier run registered (`PidRegistry.reap`): one still running
is killed with its process group; one already dead but not yet collected (a zombie: the parent-death signal killed
it with the app, and init has not collected it) is not waited for; a pid now used by another process is left alone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from core.supervisor.pidfile import PidRegistry
from tests.supervisor_helpers import alive

SLEEPER = [sys.executable, '-c', 'import time; time.sleep(60)']


def test_reap_kills_what_runs_and_does_not_wait_for_the_dead(tmp_path: Path) -> None:
    earlier = PidRegistry(tmp_path / 'pids.json')
    running = subprocess.Popen(SLEEPER, start_new_session=True)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'], start_new_session=True)
    unrelated = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        for proc in (running, dead, unrelated):
            earlier.add(proc.pid, 'tiny')
        earlier._current()[str(unrelated.pid)]['start_time'] -= 3600  # as if the pid had been reused since
        earlier._save()
        while psutil.Process(dead.pid).status() != psutil.STATUS_ZOMBIE:  # exited; nobody has collected it
            time.sleep(0.01)

        started = time.monotonic()
        killed = PidRegistry(tmp_path / 'pids.json').reap(timeout=5)
        took = time.monotonic() - started
        assert killed == [running.pid]
        assert not alive(running.pid) and alive(unrelated.pid)
        assert took < 1, took  # the zombie was not waited on for the whole timeout
        assert PidRegistry(tmp_path / 'pids.json')._read() == {}
    finally:
        for proc in (running, dead, unrelated):
            proc.kill()
            proc.wait()
