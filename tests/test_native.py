"""`--native` for real: the app in its pywebview window (Qt WebEngine) on a virtual X screen with a window manager,
closed the way a user closes it, and nothing of it left afterwards.

Needs Xvfb, openbox and wmctrl (Debian packages; `make native-deps`, part of `make test`, installs them as root
with the Qt libraries) and `.[native]` in the venv. The window is closed through the window manager
(`wmctrl -c`: _NET_CLOSE_WINDOW, which openbox turns into the WM_DELETE_WINDOW message its close button sends),
not by killing or destroying it, so the app's own close path runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import poll, start_app, stop_process

pytestmark = [pytest.mark.native, pytest.mark.slow]
TITLE = 'Llama Async Proxy'
TOOLS = ('Xvfb', 'openbox', 'wmctrl')


def _run(argv: list[str], display: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env={**os.environ, 'DISPLAY': display}, capture_output=True, text=True, timeout=10, check=False
    )


def windows(display: str) -> list[tuple[int, str]]:
    """(pid, title) of every window the window manager lists (`wmctrl -lp`: id, desktop, pid, host, title)."""
    out = _run(['wmctrl', '-lp'], display).stdout
    rows = [line.split(None, 4) for line in out.splitlines()]
    return [(int(r[2]), r[4] if len(r) > 4 else '') for r in rows if len(r) >= 4]


@pytest.fixture
def display() -> Iterator[str]:
    """A virtual X screen (Xvfb picks a free display number itself) with openbox managing its windows."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f'{missing} not found: apt-get install xvfb openbox wmctrl (make test does as root)'
    read_fd, write_fd = os.pipe()
    xvfb = subprocess.Popen(
        ['Xvfb', '-displayfd', str(write_fd), '-screen', '0', '1280x900x24', '-nolisten', 'tcp'],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        number = f.readline().strip()  # written once the server accepts clients; EOF if Xvfb failed
    wm: subprocess.Popen | None = None
    try:
        assert number, f'Xvfb did not start (exit {xvfb.poll()})'
        name = f':{number}'
        wm = subprocess.Popen(
            ['openbox'], env={**os.environ, 'DISPLAY': name}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        poll(lambda: _run(['wmctrl', '-m'], name).returncode == 0, 20, 'openbox managing the screen')
        yield name
    finally:
        if wm is not None:
            stop_process(wm)
        stop_process(xvfb)


def _drain(proc: subprocess.Popen, lines: list[str]) -> None:
    """Keep reading the app's output so a full pipe never blocks it; the test reads `lines`."""
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
    except (ValueError, OSError):  # closed by stop_process after a failure
        pass


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_native_window_shows_the_app_and_closing_it_stops_the_app_and_its_children(
    tmp_path: Path, models_dir: Path, tiny_model: Path, display: str
) -> None:
    import webview  # noqa: F401  # `.[native]`: a missing pywebview fails the test rather than skipping it

    app = start_app(tmp_path, '--native', '--models-dir', str(models_dir), env={'DISPLAY': display}, deadline_s=90)
    lines: list[str] = []
    reader = threading.Thread(target=_drain, args=(app.proc, lines), daemon=True)
    reader.start()

    def said(text: str) -> bool:
        if app.proc.poll() is not None:
            raise AssertionError(f'the app exited with {app.proc.returncode}:\n{"".join(lines)}')
        return any(text in line for line in lines)

    try:
        # The window opened, belongs to the app (its window process is the app's child), and its page loaded and
        # connected to NiceGUI (pywebview's `loaded` event, then the page's websocket).
        window_pid = poll(
            lambda: next((pid for pid, title in windows(display) if title == TITLE), None), 90, 'the window opened'
        )
        family = {p.pid for p in psutil.Process(app.proc.pid).children(recursive=True)}
        assert window_pid in family, (window_pid, family)
        poll(lambda: said('native window: page loaded'), 90, 'the page loaded in the window')
        poll(lambda: said('native: a page connected: /'), 60, "the window's page connected")

        r = httpx.post(f'{app.base_url}/api/models/tiny-llama/load', timeout=120)
        assert r.status_code == 200, r.text
        child = r.json()['pid']
        assert httpx.get(f'{app.base_url}/api/models/tiny-llama', timeout=10).json()['pid'] == child
        descendants = [p.pid for p in psutil.Process(app.proc.pid).children(recursive=True)]
        assert child in descendants

        closed = _run(['wmctrl', '-c', TITLE], display)  # as the title bar's close button
        assert closed.returncode == 0, closed.stderr
        assert app.proc.wait(timeout=60) == 0, ''.join(lines)
        reader.join(timeout=10)
        out = ''.join(lines)
        assert 'native window closed' in out, out
        assert 'native window: shutdown done' in out, out  # logged after System.stop finished
        poll(lambda: all(_gone(pid) for pid in descendants), 20, f'every child of the app gone ({descendants})')
        assert not [w for w in windows(display) if w[1] == TITLE]
    finally:
        stop_process(app.proc, timeout=20)
