"""Small file helpers shared by the services."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: Path, text: str, encoding: str = 'utf-8') -> None:
    """Write `text` so that readers see either the old file or the new one, never a torn write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'w', encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep_copy(path: Path, tag: str) -> Path:
    """Copy `path` byte for byte to `<name>.<tag>-<YYYYmmdd-HHMMSS>` beside it (never over an existing file) and
    return the copy; raises OSError when it cannot be read or the copy cannot be written in full. The copy is 0600:
    a config file may hold API keys."""
    data = path.read_bytes()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for n in range(100):
        copy = path.with_name(f'{path.name}.{tag}-{stamp}' + (f'-{n}' if n else ''))
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        return copy
    raise FileExistsError(f'{path.name}.{tag}-{stamp}: 100 copies already')


def write_private(path: Path, text: str) -> None:
    """`atomic_write_text` for a secret: the folder 0700; the file is 0600 already (mkstemp creates it so)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_text(path, text)


def existing_dirs(paths: Iterable[str | Path]) -> dict[str, bool]:
    """`{path: is a folder}` for each path as given (`~` expanded for the check only); blocking, for a thread."""
    return {str(p): Path(p).expanduser().is_dir() for p in paths}
