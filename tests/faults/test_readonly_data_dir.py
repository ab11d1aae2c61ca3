"""A data dir that cannot be created or written stops the app at start with one line naming the folder and what
to do, exit code 2, and no traceback (issue 14, item 2). The app runs through its real CLI.

Tests run as root here, and root ignores permission bits: the real read-only cases use a read-only tmpfs in a
private mount namespace (`unshare`), a path under a file, and /sys (which refuses new entries even to root); the
chmod case runs only as another user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from core.settings import SettingsManager
from core.system import DataDirError, System
from tests.conftest import ROOT

MAIN = [sys.executable, str(ROOT / 'main.py'), '--no-browser', '--port', '1']  # never reaches binding the port


def app_env(tmp_path: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST' and not k.startswith(('LAP_', 'NICEGUI_'))}
    env.update({'LAP_DATA_DIR': str(data_dir), 'LAP_CONFIG': str(tmp_path / 'config.json'), 'PYTHONUNBUFFERED': '1'})
    env['LAP_SCAN_WELL_KNOWN_DIRS'] = 'false'
    return env


def assert_refused(out: subprocess.CompletedProcess[str], data_dir: Path | str, why: str) -> None:
    assert out.returncode == 2, out.stderr
    assert 'Traceback' not in out.stderr and 'Traceback' not in out.stdout
    [line] = [ln for ln in out.stderr.splitlines() if 'data dir' in ln]
    assert f'cannot use the data dir {data_dir} ({why}' in line
    assert 'LAP_DATA_DIR' in line and 'permissions' in line


def run_app(tmp_path: Path, data_dir: Path | str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), *MAIN],
        env=app_env(tmp_path, Path(data_dir)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / 'file.txt').write_text('not a folder')
    data_dir = tmp_path / 'file.txt' / 'data'
    assert_refused(run_app(tmp_path, data_dir), data_dir, 'Not a directory')


def test_a_data_dir_where_nothing_can_be_created(tmp_path: Path) -> None:
    data_dir = Path('/sys/lap-data-dir-test')
    if not Path('/sys/kernel').is_dir():
        pytest.skip('no sysfs at /sys')
    out = run_app(tmp_path, data_dir)
    assert not data_dir.exists()
    assert_refused(out, data_dir, '')


@pytest.mark.parametrize('inside', ['', 'data'], ids=['read-only-dir', 'parent-read-only'])
def test_a_read_only_mount(tmp_path: Path, inside: str) -> None:
    """The folder exists on a read-only file system (mkdir with exist_ok succeeds; the first write fails), or the
    folder would have to be created on one."""
    mount_point = tmp_path / 'ro'
    mount_point.mkdir()
    # The mount exists only inside the private namespace of that one command, and the app runs inside it.
    script = f'mount -t tmpfs -o ro tmpfs {mount_point} && exec "$@"'
    prefix = ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script, 'sh']
    if not shutil.which('unshare') or subprocess.run([*prefix, 'true'], capture_output=True).returncode != 0:
        pytest.skip('cannot mount a read-only tmpfs in a private mount namespace (unshare)')
    data_dir = mount_point / inside if inside else mount_point
    assert_refused(run_app(tmp_path, data_dir, prefix), data_dir, 'Read-only file system')


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores permission bits (the read-only mount test covers it)')
@pytest.mark.parametrize('inside', ['', 'data'], ids=['read-only-dir', 'parent-read-only'])
def test_a_folder_without_write_permission(tmp_path: Path, inside: str) -> None:
    folder = tmp_path / 'locked'
    folder.mkdir()
    folder.chmod(0o500)
    try:
        data_dir = folder / inside if inside else folder
        assert_refused(run_app(tmp_path, data_dir), data_dir, 'Permission denied')
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize('blocker', ['logs', 'lap.sqlite3'])
def test_what_the_data_dir_holds_cannot_be_written(
    settings_factory: Callable[..., SettingsManager], tmp_path: Path, blocker: str
) -> None:
    """The folder takes writes but its logs folder is a file, or its SQLite file a folder: the same clear error."""
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    if blocker == 'logs':
        (data_dir / blocker).write_text('x')
    else:
        (data_dir / blocker).mkdir()
    with pytest.raises(DataDirError, match=f'cannot use the data dir {data_dir}'):
        System(settings_factory(data_dir=data_dir))
    out = run_app(tmp_path, data_dir)
    assert_refused(out, data_dir, '')
