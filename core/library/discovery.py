"""Find GGUF files: configured folders (recursive) and the caches other tools download into.

Only `stat` and a 4-byte magic check for `.bin` files happen here; headers are read by the library, through
the metadata cache. Nothing here raises for a missing or unreadable folder: it is reported in the result.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.library.gguf_header import is_gguf

SPLIT_RE = re.compile(r'^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$', re.IGNORECASE)


@dataclass(slots=True)
class FoundFile:
    path: Path  # where it was found (absolute, links not resolved: split parts and mmproj pair by folder)
    real: Path  # resolved target; the dedupe and cache key
    size: int
    mtime_ns: int
    error: str | None = None  # set for entries that cannot be read (broken link, FIFO, ...)

    @property
    def split(self) -> tuple[str, int, int] | None:
        """(base name, part number, part count) for `name-00001-of-00003.gguf`."""
        m = SPLIT_RE.match(self.path.name)
        return (m['base'], int(m['no']), int(m['count'])) if m else None

    @property
    def looks_like_mmproj(self) -> bool:
        return 'mmproj' in self.path.name.lower()


@dataclass(slots=True)
class Discovery:
    roots: list[Path] = field(default_factory=list)  # folders that exist and were walked
    files: list[FoundFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) for files not used
    dir_errors: list[tuple[str, str]] = field(default_factory=list)  # (folder, error)


def well_known_dirs(env: dict[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """Download caches of the Hugging Face hub, llama.cpp (`-hf`) and LM Studio, when they exist."""
    env = dict(os.environ) if env is None else env
    home = home or Path(env.get('HOME') or Path.home())
    xdg_cache = Path(env['XDG_CACHE_HOME']) if env.get('XDG_CACHE_HOME') else home / '.cache'
    if env.get('HF_HUB_CACHE'):
        hf = Path(env['HF_HUB_CACHE'])
    elif env.get('HF_HOME'):
        hf = Path(env['HF_HOME']) / 'hub'
    else:
        hf = xdg_cache / 'huggingface' / 'hub'
    llama = Path(env['LLAMA_CACHE']) if env.get('LLAMA_CACHE') else xdg_cache / 'llama.cpp'
    candidates = [hf, llama, home / '.lmstudio' / 'models', xdg_cache / 'lm-studio' / 'models']
    return [p.expanduser() for p in candidates if p.expanduser().is_dir()]


def discover(dirs: Iterable[Path]) -> Discovery:
    """Every GGUF under `dirs`. A link is followed only to a target inside one of `dirs` (a link to /etc/passwd or
    to another folder is skipped, with the reason); FIFOs and devices are skipped without being opened."""
    dirs = [Path(d).expanduser().absolute() for d in dirs]
    out = Discovery()
    found: dict[Path, FoundFile] = {}  # real path -> the best way it was found
    seen_dirs: set[Path] = set()
    inside = _Inside(dirs)
    for root in dirs:
        root = Path(root).expanduser().absolute()
        try:
            real_root = root.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            out.dir_errors.append((str(root), f'cannot open folder: {_reason(e)}'))
            continue
        if not real_root.is_dir():
            out.dir_errors.append((str(root), 'not a folder'))
            continue
        if real_root in seen_dirs:
            continue
        out.roots.append(root)
        _walk(root, out, found, seen_dirs, inside)
    out.files = sorted(found.values(), key=lambda f: str(f.path))
    return out


def _better(new: FoundFile, old: FoundFile) -> bool:
    """The same file found twice: keep the real file over a link to it, else the first path in order."""
    return (new.path != new.real, str(new.path)) < (old.path != old.real, str(old.path))


class _Inside:
    """Whether a real path lies inside one of the (resolved) roots."""

    def __init__(self, dirs: list[Path]) -> None:
        self.roots: list[Path] = []
        for d in dirs:
            try:
                self.roots.append(d.resolve(strict=True))
            except (OSError, RuntimeError):
                continue

    def __call__(self, real: Path) -> bool:
        return any(real == r or real.is_relative_to(r) for r in self.roots)


OUTSIDE = 'a link to outside the model folders'


def _walk(root: Path, out: Discovery, found: dict[Path, FoundFile], seen_dirs: set[Path], inside: _Inside) -> None:
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            real_folder = folder.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            out.dir_errors.append((str(folder), f'cannot open folder: {_reason(e)}'))
            continue
        if real_folder in seen_dirs:  # a symlink loop or the same folder reached twice
            continue
        if not inside(real_folder):
            out.skipped.append((str(folder), OUTSIDE))
            continue
        seen_dirs.add(real_folder)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            out.dir_errors.append((str(folder), f'cannot list folder: {_reason(e)}'))
            continue
        for entry in entries:
            name = entry.name
            lower = name.lower()
            try:
                if entry.is_dir():  # follows links (HF snapshots are links to blobs; folders may be too)
                    if not name.startswith('.'):  # .locks, .no_exist, .git, ...
                        stack.append(Path(entry.path))
                    continue
            except OSError:
                pass
            if not lower.endswith(('.gguf', '.bin')):
                continue
            _add_file(Path(entry.path), lower.endswith('.bin'), out, found, inside)


def _add_file(path: Path, is_bin: bool, out: Discovery, found: dict[Path, FoundFile], inside: _Inside) -> None:
    try:
        st = path.stat()  # follows links
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        if path.is_symlink():
            found[path] = FoundFile(path, path, 0, 0, f'broken symlink: {_reason(e)}')
        elif not is_bin:
            found[path] = FoundFile(path, path, 0, 0, f'cannot read: {_reason(e)}')
        return
    if not inside(real):
        out.skipped.append((str(path), OUTSIDE))
        return
    if not stat.S_ISREG(st.st_mode):  # never opened: reading a FIFO blocks, a device may never end
        out.skipped.append((str(path), 'not a regular file (FIFO, device, ...)'))
        return
    candidate = FoundFile(path, real, st.st_size, st.st_mtime_ns)
    old = found.get(real)
    if old is not None:
        if _better(candidate, old):
            found[real] = candidate
        return
    if is_bin and not is_gguf(path):
        out.skipped.append((str(path), '.bin file without the GGUF magic'))
        return
    found[real] = candidate


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
