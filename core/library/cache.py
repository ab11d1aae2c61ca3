"""Header metadata cached in SQLite, keyed by (real path, size, mtime_ns): a warm scan re-reads nothing unchanged.

A file that failed to parse is cached too (with its error), so a corrupt file is not re-read on every scan.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.library.meta import FileInfo
from core.store import Store

# Bump when FileInfo changes shape, or the reader accepts what it refused: old rows are then ignored and rewritten.
SCHEMA_VERSION = 2  # 2: files without tensors (vocab-only) are no longer "truncated"

DDL = """
CREATE TABLE IF NOT EXISTS library_files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    schema INTEGER NOT NULL,
    info TEXT,
    error TEXT,
    read_at REAL NOT NULL
);
"""


@dataclass(slots=True)
class CachedFile:
    info: FileInfo | None
    error: str | None


class MetadataCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.ensure_schema(DDL)

    def load(self) -> dict[tuple[str, int, int], tuple[str | None, str | None]]:
        """Every current row: (path, size, mtime_ns) -> (info JSON, error). JSON is decoded on use."""
        rows = self.store.query(
            'SELECT path, size, mtime_ns, info, error FROM library_files WHERE schema = ?', (SCHEMA_VERSION,)
        )
        return {(r['path'], r['size'], r['mtime_ns']): (r['info'], r['error']) for r in rows}

    @staticmethod
    def decode(row: tuple[str | None, str | None]) -> CachedFile:
        info_json, error = row
        if info_json is None:
            return CachedFile(None, error)
        return CachedFile(FileInfo.from_dict(json.loads(info_json)), error)

    def save(self, rows: list[tuple[Path, int, int, FileInfo | None, str | None]]) -> None:
        if not rows:
            return
        now = time.time()
        self.store.executemany(
            'INSERT OR REPLACE INTO library_files (path, size, mtime_ns, schema, info, error, read_at) '
            'VALUES (?, ?, ?, ?, ?, ?, ?)',
            [
                (str(p), size, mtime, SCHEMA_VERSION, None if info is None else _dumps(info.as_dict()), err, now)
                for p, size, mtime, info, err in rows
            ],
        )

    def prune(self, keep: set[str]) -> None:
        """Forget files that are no longer found anywhere."""
        stale = [
            (p,) for (p,) in ((r['path'],) for r in self.store.query('SELECT path FROM library_files')) if p not in keep
        ]
        if stale:
            self.store.executemany('DELETE FROM library_files WHERE path = ?', stale)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(',', ':'), default=str)
