"""ModelLibrary: the set of models on disk, kept current, with metadata and fit estimates.

A scan = discovery (stat only) -> header metadata per file (memory, then SQLite cache, then the lazy reader)
-> models (split parts joined, projectors attached, ids assigned) -> a diff published as a `models`/`library`
event. Scans run in a worker thread, one at a time; the folder watcher and `config` changes trigger them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.library.cache import CachedFile, MetadataCache
from core.library.discovery import Discovery, FoundFile, discover, well_known_dirs
from core.library.fit import FitEstimate, estimate, free_memory
from core.library.gguf_header import GGUFError, read_header
from core.library.meta import CHAT_TEMPLATE_KEY, FileInfo, ModelMeta, TensorStats, capabilities, summarise
from core.library.watch import FolderWatcher
from core.model_params import ModelParams, effective_params

log = logging.getLogger(__name__)

_SLUG_BAD = re.compile(r'[^a-z0-9._-]+')
_GENERIC_STEMS = re.compile(r'^(model|ggml-model.*|unnamed|consolidated.*)$')
READ_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Header parsing is CPU-bound Python/numpy (~3 ms for a 150k-token vocabulary), so threads gain little under the
# GIL. A large cold scan is shared among forked worker processes instead: they only parse and return values (no
# logging, no imports, no shared locks), which keeps fork safe in the threaded app.
PROCESS_SCAN_MIN_FILES = 64


@dataclass(slots=True)
class ModelEntry:
    id: str
    aliases: list[str]
    path: Path  # first (or only) part, as found
    paths: list[Path]
    mmproj: Path | None
    size_bytes: int
    mtime: float  # newest part, seconds since the epoch
    meta: ModelMeta
    capabilities: list[str]
    error: str | None = None
    kv: dict[str, Any] = field(default_factory=dict, repr=False)  # all key/values, big arrays summarised
    fingerprint: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def chat_template(self) -> str | None:
        tpl = self.kv.get(CHAT_TEMPLATE_KEY)
        return tpl if isinstance(tpl, str) else None


@dataclass(slots=True)
class ScanReport:
    roots: list[str] = field(default_factory=list)
    models: int = 0
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    dir_errors: list[dict[str, str]] = field(default_factory=list)  # {path, error}
    files_read: int = 0  # headers actually parsed (cache misses)
    duration_s: float = 0.0
    finished_at: float = 0.0


class ModelLibrary:
    def __init__(self, config: Any, store: Any, bus: Any) -> None:
        self.config, self.store, self.bus = config, store, bus
        self.cache = MetadataCache(store)
        self._entries: dict[str, ModelEntry] = {}
        self._lookup: dict[str, str] = {}  # id / alias (and their lower case) -> id
        self._infos: dict[tuple[str, int, int], CachedFile] = {}  # this process's view of the cache
        self._db_rows: dict[tuple[str, int, int], tuple[str | None, str | None]] | None = None
        self._scan_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher = FolderWatcher(self._on_files_changed)
        self.last_scan = ScanReport()
        # endpoints -> each RPC worker's free memory (None where unknown); set by the System (core/system.py)
        self.rpc_memory: Callable[[list[str]], list[int | None]] | None = None
        if hasattr(config, 'on_change'):
            config.on_change(self._on_config_change)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._watcher.start(self.roots())  # first, so nothing added during the scan is missed
        await self.rescan()

    async def stop(self) -> None:
        await self._watcher.stop()
        self._loop = None

    # ---- queries -------------------------------------------------------------------------------------------
    def models(self) -> list[ModelEntry]:
        return sorted(self._entries.values(), key=lambda e: e.id)

    def get(self, name: str) -> ModelEntry | None:
        """By id or alias (file name with or without `.gguf`); exact first, then ignoring case."""
        model_id = self._lookup.get(name) or self._lookup.get(name.lower())
        return self._entries.get(model_id) if model_id else None

    def fit(
        self, entry: ModelEntry, params: Any = None, *, ram_free: int | None = None, vram_free: int | None = None
    ) -> FitEstimate:
        """Memory estimate for `entry` with `params` (default: the configured launch parameters)."""
        if params is None:
            params = self.effective_params(entry.id)
        if ram_free is None and vram_free is None:
            ram_free, vram_free = free_memory()
        workers = getattr(params, 'rpc', None) if not isinstance(params, dict) else params.get('rpc')
        rpc_free = self.rpc_memory(workers) if workers and self.rpc_memory is not None else None
        return estimate(entry.meta, params, ram_free=ram_free, vram_free=vram_free, rpc_free=rpc_free)

    async def fits(self, entries: list[ModelEntry] | None = None) -> dict[str, FitEstimate]:
        """Fit estimates for `entries` (default: all usable), free memory read once and off the loop (NVML and
        psutil may block)."""
        ram_free, vram_free = await asyncio.to_thread(free_memory)
        found = self.models() if entries is None else entries
        return {e.id: self.fit(e, ram_free=ram_free, vram_free=vram_free) for e in found if not e.error}

    def effective_params(self, model_id: str) -> ModelParams:
        """Global launch defaults overlaid by the model's own (`None` inherits)."""
        return effective_params(self.config.settings, model_id)

    @property
    def watching(self) -> list[Path]:
        return list(self._watcher.dirs) if self._watcher.running else []

    # ---- scanning ------------------------------------------------------------------------------------------
    async def rescan(self) -> ScanReport:
        """Scan now (off the event loop); publishes what changed. Concurrent calls queue up."""
        async with self._scan_lock:
            report, entries = await asyncio.to_thread(self._scan_sync)
            self._apply(report, entries)
            return report

    def roots(self) -> list[Path]:
        """The folders models are found in (configured, then well-known caches); launch file paths must be inside."""
        s = self.config.settings
        dirs = [Path(d).expanduser() for d in s.models_dirs]
        if s.scan_well_known_dirs:
            dirs += [d for d in well_known_dirs() if d not in dirs]
        return dirs

    def _scan_sync(self) -> tuple[ScanReport, list[ModelEntry]]:
        t0 = time.perf_counter()
        disc = discover(self.roots())
        infos, files_read = self._file_infos(disc.files)
        entries = _build_entries(disc, infos)
        report = ScanReport(
            roots=[str(r) for r in disc.roots],
            models=len(entries),
            skipped=[{'path': p, 'reason': r} for p, r in disc.skipped],
            dir_errors=[{'path': p, 'error': e} for p, e in disc.dir_errors],
            files_read=files_read,
        )
        report.duration_s = time.perf_counter() - t0
        report.finished_at = time.time()
        return report, entries

    def _file_infos(self, files: list[FoundFile]) -> tuple[dict[Path, CachedFile], int]:
        """Metadata per found file: from memory, else the SQLite cache, else its header."""
        if self._db_rows is None:
            self._db_rows = self.cache.load()
        out: dict[Path, CachedFile] = {}
        misses: list[FoundFile] = []
        current: dict[tuple[str, int, int], CachedFile] = {}
        for f in files:
            if f.error:
                out[f.path] = CachedFile(None, f.error)
                continue
            key = (str(f.real), f.size, f.mtime_ns)
            hit = self._infos.get(key)
            if hit is None and key in self._db_rows:
                try:
                    hit = self.cache.decode(self._db_rows[key])
                except (ValueError, KeyError, TypeError):
                    hit = None  # a row from an older layout: read the file again
            if hit is None:
                misses.append(f)
            else:
                out[f.path] = current[key] = hit
        if misses:
            results = _read_many(misses)
            rows = []
            for f, got in zip(misses, results, strict=True):
                out[f.path] = current[(str(f.real), f.size, f.mtime_ns)] = got
                rows.append((f.real, f.size, f.mtime_ns, got.info, got.error))
            self.cache.save(rows)
        if set(current) != set(self._infos):
            self.cache.prune({k[0] for k in current})
        self._infos = current
        self._db_rows = {}  # everything useful from the table is in memory now
        return out, len(misses)

    def _apply(self, report: ScanReport, entries: list[ModelEntry]) -> None:
        old = self._entries
        new = {e.id: e for e in entries}
        report.added = sorted(set(new) - set(old))
        report.removed = sorted(set(old) - set(new))
        report.changed = sorted(i for i in set(new) & set(old) if new[i].fingerprint != old[i].fingerprint)
        self._entries, self._lookup = new, self._names(entries)
        self.last_scan = report
        if report.added or report.removed or report.changed:
            log.info('models: %d (+%d -%d ~%d)', len(new), len(report.added), len(report.removed), len(report.changed))
            self.bus.publish(
                'models',
                'library',
                {
                    'added': report.added,
                    'removed': report.removed,
                    'changed': report.changed,
                    'count': len(new),
                },
            )

    async def _on_files_changed(self, paths: set[str]) -> None:
        await self.rescan()

    def _names(self, entries: list[ModelEntry]) -> dict[str, str]:
        """Every name a model answers to -> its id. Ids win, then the aliases set in its parameters, then those
        from its file name; the first claim of a name wins; each also ignoring case."""
        configured = getattr(getattr(self.config, 'settings', None), 'models', None) or {}
        lookup: dict[str, str] = {}
        for e in entries:
            lookup[e.id] = e.id
        for e in entries:
            params = configured.get(e.id)
            for a in (getattr(params, 'aliases', None) or []) if params is not None else []:
                lookup.setdefault(a, e.id)
        for e in entries:
            for a in e.aliases:
                lookup.setdefault(a, e.id)
        for key, value in list(lookup.items()):
            lookup.setdefault(key.lower(), value)
        return lookup

    def _rename(self) -> None:
        self._lookup = self._names(list(self._entries.values()))

    def _on_config_change(self, settings: Any, changed: list[str]) -> None:
        if 'models' in changed:  # per-model aliases: names apply at once (rebuilt on the loop, like a scan)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._rename)
            else:
                self._rename()
        if not {'models_dirs', 'scan_well_known_dirs'} & set(changed):
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: loop.create_task(self._reconfigure()))

    async def _reconfigure(self) -> None:
        try:
            if self._loop is not None:
                await self._watcher.start(self.roots())
            await self.rescan()
        except Exception:
            log.exception('rescan after a settings change failed')


# ---- building entries (pure functions over the scan) -------------------------------------------------------


def _read_many(files: list[FoundFile]) -> list[CachedFile]:
    workers = min(READ_WORKERS, os.cpu_count() or 1)
    if len(files) >= PROCESS_SCAN_MIN_FILES and workers > 1 and 'fork' in multiprocessing.get_all_start_methods():
        try:
            ctx = multiprocessing.get_context('fork')
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                results = list(pool.map(_read_one, files, chunksize=16))
            for f, r in zip(files, results, strict=True):
                if r.error and r.error.startswith('cannot read: internal'):
                    log.error('reading %s failed: %s', f.path, r.error)
            return results
        except Exception:  # a broken pool must not cost the scan: read in this process instead
            log.exception('process pool scan failed; reading in threads')
    if len(files) > 4 and READ_WORKERS > 1:
        with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix='gguf-read') as pool:
            return list(pool.map(_read_one, files))
    return [_read_one(f) for f in files]


def _read_one(f: FoundFile) -> CachedFile:
    """Never raises and never logs (it may run in a forked worker): errors come back as text."""
    try:
        return CachedFile(FileInfo.from_header(read_header(f.path)), None)
    except GGUFError as e:
        return CachedFile(None, f'invalid GGUF: {e}')
    except OSError as e:
        return CachedFile(None, f'cannot read: {e.strerror or e}')
    except Exception as e:  # a reader bug must cost one file, not the scan
        return CachedFile(None, f'cannot read: internal error {type(e).__name__}: {e}')


def _is_projector(f: FoundFile, c: CachedFile) -> bool:
    if c.info is not None:
        kv = c.info.kv
        if kv.get('general.type') in ('mmproj', 'clip') or kv.get('general.architecture') == 'clip':
            return True
    return f.looks_like_mmproj


def _build_entries(disc: Discovery, infos: dict[Path, CachedFile]) -> list[ModelEntry]:
    projectors: dict[Path, list[FoundFile]] = defaultdict(list)
    singles: list[FoundFile] = []
    splits: dict[tuple[Path, str, int], dict[int, FoundFile]] = defaultdict(dict)
    for f in disc.files:
        c = infos[f.path]
        if _is_projector(f, c):
            projectors[f.path.parent].append(f)
        elif f.split is not None:
            base, no, count = f.split
            splits[(f.path.parent, base, count)][no] = f
        else:
            singles.append(f)

    drafts: list[ModelEntry] = [_entry([f], infos, f.path.stem, None) for f in singles]
    for (_folder, base, count), parts in splits.items():
        missing = [n for n in range(1, count + 1) if n not in parts]
        error = f'split model is missing part(s) {", ".join(map(str, missing))} of {count}' if missing else None
        drafts.append(_entry([parts[n] for n in sorted(parts)], infos, base, error))

    used_projectors: set[Path] = set()
    for e in drafts:
        mm = _pick_projector(e.path, projectors.get(e.path.parent, []), infos)
        if mm is not None:
            e.mmproj = mm
            used_projectors.add(mm)
            e.capabilities = capabilities(e.meta, has_mmproj=True) if not e.error else []
            e.fingerprint += (str(mm), _file_key(mm, disc))
    for folder_projectors in projectors.values():
        for p in folder_projectors:
            if p.path not in used_projectors:
                disc.skipped.append((str(p.path), 'multimodal projector without a model in its folder'))
    _assign_ids(drafts)
    return drafts


def _entry(parts: list[FoundFile], infos: dict[Path, CachedFile], stem: str, error: str | None) -> ModelEntry:
    first = parts[0]
    cached = [infos[p.path] for p in parts]
    errors = [
        f'{p.path.name}: {c.error}' if len(parts) > 1 else c.error
        for p, c in zip(parts, cached, strict=True)
        if c.error
    ]
    if errors and not error:
        error = '; '.join(e for e in errors if e)
    head = cached[0].info
    if head is not None and len(parts) > 1 and first.split and first.split[1] != 1:
        head = None  # the metadata lives in part 1, which is missing
    if head is not None:
        stats = TensorStats.merged([c.info.tensors for c in cached if c.info is not None])
        meta = summarise(head.kv, stats)
        kv = head.kv
        if not error and not any(c.info.tensors.count for c in cached if c.info is not None):
            # e.g. llama.cpp's models/ggml-vocab-*.gguf: listed with what they hold, never started, never "corrupt"
            error = 'vocab-only file: a tokenizer and its metadata, no weights (not loadable as a model)'
    else:
        meta, kv = ModelMeta(), {}
    fingerprint = (*((str(p.real), p.size, p.mtime_ns) for p in parts), error)
    return ModelEntry(
        id=stem,  # replaced by _assign_ids
        aliases=[],
        path=first.path,
        paths=[p.path for p in parts],
        mmproj=None,
        size_bytes=sum(p.size for p in parts),
        mtime=max(p.mtime_ns for p in parts) / 1e9,
        meta=meta,
        capabilities=[] if error else capabilities(meta, has_mmproj=False),
        error=error,
        kv=kv,
        fingerprint=fingerprint,
    )


def _pick_projector(model: Path, candidates: list[FoundFile], infos: dict[Path, CachedFile]) -> Path | None:
    """The usable projector in the model's folder; with several, the one whose name shares most with it."""
    good = [c for c in candidates if infos[c.path].error is None]
    if not good:
        return None

    def shared(c: FoundFile) -> int:
        a, b = c.path.name.lower().replace('mmproj-', ''), model.name.lower()
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    return max(sorted(good, key=lambda c: str(c.path)), key=shared).path


def _file_key(path: Path, disc: Discovery) -> tuple[int, int]:
    for f in disc.files:
        if f.path == path:
            return (f.size, f.mtime_ns)
    return (0, 0)


def slugify(text: str) -> str:
    return _SLUG_BAD.sub('-', text.lower()).strip('-.')


def _assign_ids(entries: list[ModelEntry]) -> None:
    """Stable, unique, URL-safe ids: the file name (without `.gguf` and the split suffix), slugified; a generic
    file name (`model.gguf`, `ggml-model-*.gguf`) takes `general.name` and the quant instead. A clash adds
    the folder name, then a counter, in path order so the same files always get the same ids."""
    entries.sort(key=lambda e: str(e.path))
    taken: set[str] = set()
    for e in entries:
        stem = e.id
        base = slugify(stem)
        if (not base or _GENERIC_STEMS.match(base)) and e.meta.name:
            base = slugify(f'{e.meta.name}-{e.meta.file_type or ""}')
        base = base or 'model'
        candidate = base
        if candidate in taken:
            candidate = f'{base}-{slugify(e.path.parent.name)}'.strip('-')
        n = 2
        while candidate in taken:
            candidate = f'{base}-{n}'
            n += 1
        taken.add(candidate)
        e.id = candidate
        names = [e.path.name, e.path.name.removesuffix('.gguf').removesuffix('.GGUF')]
        if len(e.paths) > 1:
            names.append(stem)
        e.aliases = [a for a in dict.fromkeys(names) if a and a != candidate]
