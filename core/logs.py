"""Logs: the app's own `logging` records and every llama-server line, in one ring buffer, published as events,
and written to a rotating file per source in the data dir (by a background thread, so the loop never waits on disk).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from core.events import EventBus

LEVELS = ('debug', 'info', 'warning', 'error')
_LEVEL_RANK = {name: i for i, name in enumerate(LEVELS)}


@dataclass(frozen=True, slots=True)
class LogRecord:
    seq: int
    ts: float
    level: str
    source: str  # 'app' for our own logging, 'llama-server' for child output
    message: str
    model: str | None = None
    logger: str | None = None

    def as_dict(self) -> dict[str, Any]:  # not dataclasses.asdict: it deep-copies, and every line is published
        return {
            'seq': self.seq,
            'ts': self.ts,
            'level': self.level,
            'source': self.source,
            'message': self.message,
            'model': self.model,
            'logger': self.logger,
        }


# llama.cpp prefixes some lines with a level letter ("E ", "W ", "I ") or tags like "srv  ... error".
_LLAMA_LEVEL = re.compile(r'^(?:\d+\.\d+\.\d+\.\d+\s+)?([DIWE])\s')


_LETTER_LEVEL = {'D': 'debug', 'I': 'info', 'W': 'warning', 'E': 'error'}


def llama_line_level(line: str) -> str:
    m = _LLAMA_LEVEL.match(line)
    if m:
        return _LETTER_LEVEL[m.group(1)]
    low = line.lower()
    if 'error' in low or 'failed' in low or 'exception' in low:
        return 'error'
    if 'warn' in low:
        return 'warning'
    return 'info'


class LogService:
    def __init__(
        self,
        bus: EventBus,
        capacity: int = 10_000,
        log_dir: Path | None = None,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 3,
    ) -> None:
        self.bus = bus
        self._buf: deque[LogRecord] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.log_dir = log_dir
        self._files: _FileWriter | None = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._files = _FileWriter(log_dir, max_bytes, backups)

    def add(
        self, source: str, message: str, level: str = 'info', model: str | None = None, logger: str | None = None
    ) -> LogRecord:
        rec = LogRecord(next(self._seq), time.time(), level, source, message.rstrip('\n'), model, logger)
        with self._lock:
            self._buf.append(rec)
        if self._files is not None:
            self._files.put(rec)
        if self.bus.wanted('logs'):
            self.bus.publish('logs', 'line', rec.as_dict())
        return rec

    @property
    def write_error(self) -> str | None:
        return None if self._files is None else self._files.write_error

    # ---- files ---------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every line added so far is on disk (blocking; call off the event loop)."""
        if self._files is not None:
            self._files.flush()

    def close(self) -> None:
        """Write what is queued and close the files; later lines stay in memory only."""
        files, self._files = self._files, None
        if files is not None:
            files.close()

    def file_sources(self) -> list[str]:
        """Sources that have a log file."""
        if self.log_dir is None or not self.log_dir.is_dir():
            return []
        return sorted(p.name.removesuffix('.log') for p in self.log_dir.glob('*.log'))

    def files(self, source: str) -> list[Path]:
        """A source's log files, oldest first (rotated backups, then the current file)."""
        if self.log_dir is None:
            return []
        base = self.log_dir / file_name(source)
        backups = sorted(
            (p for p in self.log_dir.glob(base.name + '.*') if p.suffix[1:].isdigit()),
            key=lambda p: -int(p.suffix[1:]),
        )
        return [*backups, *([base] if base.exists() else [])]

    def iter_file_bytes(self, source: str, chunk: int = 64 * 1024) -> Iterator[bytes]:
        """The source's whole log (backups then current) as one byte stream, for a download."""
        for path in self.files(source):
            try:
                with path.open('rb') as f:
                    while data := f.read(chunk):
                        yield data
            except FileNotFoundError:  # rotated away meanwhile
                continue

    def read_all(self, source: str) -> bytes:
        """The source's whole log in memory, for a page's download (blocking: call it off the loop)."""
        self.flush()
        return b''.join(self.iter_file_bytes(source))

    def configure(self, capacity: int, max_bytes: int, backups: int) -> None:
        """New limits, in force at once: the buffer keeps its newest lines, files rotate at the new size."""
        with self._lock:
            if capacity != self._buf.maxlen:
                self._buf = deque(self._buf, maxlen=capacity)
        if self._files is not None:
            self._files.max_bytes, self._files.backups = max_bytes, backups

    def add_llama_line(self, model: str, line: str) -> LogRecord:
        return self.add('llama-server', line, llama_line_level(line), model=model)

    def query(
        self,
        level: str | None = None,
        source: str | None = None,
        model: str | None = None,
        q: str | None = None,
        since: float | None = None,
        limit: int = 500,
    ) -> list[LogRecord]:
        """Newest `limit` records matching every given filter, oldest first."""
        min_rank = _LEVEL_RANK.get(level or 'debug', 0)
        needle = q.lower() if q else None
        with self._lock:
            records = list(self._buf)
        out: list[LogRecord] = []
        for rec in reversed(records):
            if _LEVEL_RANK.get(rec.level, 1) < min_rank:
                continue
            if source and rec.source != source:
                continue
            if model and rec.model != model:
                continue
            if since is not None and rec.ts <= since:
                continue
            if needle and needle not in rec.message.lower():
                continue
            out.append(rec)
            if len(out) >= limit:
                break
        out.reverse()
        return out

    def tail(self, model: str, n: int = 40) -> list[str]:
        return [r.message for r in self.query(model=model, source='llama-server', limit=n)]

    def handler(self) -> logging.Handler:
        return _ServiceHandler(self)


def file_name(source: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]', '_', source).strip('.') + '.log'


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(whole))


def format_line(rec: LogRecord) -> str:
    stamp = _second(int(rec.ts)) + f'.{int(rec.ts % 1 * 1000):03d}'
    where = f' [{rec.model}]' if rec.model else (f' [{rec.logger}]' if rec.logger else '')
    return f'{stamp} {rec.level.upper():7}{where} {rec.message}'


class _FileWriter:
    """One thread writes each source's lines to its rotating file, taking whatever is queued as one batch: one
    write and one flush per source per batch, then a pause while lines gather. llama-server logs ~9 lines per chat
    request; a `RotatingFileHandler` per line (a stat, a format and a flush each, and a thread woken each) took
    ~12 % of the app's samples at c=4 against a real llama-server."""

    BATCH = 4096
    PAUSE_S = 0.1  # a line reaches its file this much later at most (flush() waits for it)

    def __init__(self, log_dir: Path, max_bytes: int, backups: int) -> None:
        self.log_dir, self.max_bytes, self.backups = log_dir, max_bytes, backups
        # A SimpleQueue: put() from the loop is one C call, no lock shared with this thread's bookkeeping.
        self._queue: queue.SimpleQueue[LogRecord | threading.Event | None] = queue.SimpleQueue()
        self._open: dict[str, tuple[BinaryIO, int]] = {}  # source -> (file, its size)
        self.write_error: str | None = None  # why lines are missing from the files, while they are
        self._thread = threading.Thread(target=self._run, name='log files', daemon=True)
        self._thread.start()

    def put(self, rec: LogRecord) -> None:
        self._queue.put_nowait(rec)

    def flush(self) -> None:
        done = threading.Event()
        self._queue.put(done)  # set once everything before it is written
        done.wait(10)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.BATCH:
                    batch.append(self._queue.get_nowait())
            try:
                self._write([rec for rec in batch if isinstance(rec, LogRecord)])
            except Exception:  # a full disk must not take the app down; the ring buffer still has the lines
                pass
            finally:
                for marker in batch:
                    if isinstance(marker, threading.Event):
                        marker.set()
            if None in batch:
                for f, _ in self._open.values():
                    with contextlib.suppress(OSError):
                        f.close()
                self._open.clear()
                return
            time.sleep(self.PAUSE_S)

    def _write(self, records: list[LogRecord]) -> None:
        lines: dict[str, list[bytes]] = {}
        error = None
        for rec in records:
            lines.setdefault(rec.source, []).append(format_line(rec).encode('utf-8', 'replace') + b'\n')
        for source, parts in lines.items():
            try:
                self._write_source(source, parts)
            except Exception as e:  # a full disk, a failed rotation: reopened on the next batch; other sources go on
                f, _ = self._open.pop(source, (None, 0))
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.close()
                # Not logged: that would queue another line for this writer. The ring buffer keeps the lines.
                error = f'log files not written: {e}'
        if lines:
            self.write_error = error

    def _write_source(self, source: str, parts: list[bytes]) -> None:
        f, size = self._file(source)
        chunk: list[bytes] = []
        pending = 0
        for line in parts:
            if size + pending + len(line) > self.max_bytes and size + pending > 0:
                f.write(b''.join(chunk))
                f, size = self._rotate(source, f)
                chunk, pending = [], 0
            chunk.append(line)
            pending += len(line)
        f.write(b''.join(chunk))
        f.flush()
        self._open[source] = (f, size + pending)

    def _file(self, source: str) -> tuple[BinaryIO, int]:
        if source not in self._open:
            f = (self.log_dir / file_name(source)).open('ab')
            self._open[source] = (f, f.tell())
        return self._open[source]

    def _rotate(self, source: str, f: BinaryIO) -> tuple[BinaryIO, int]:
        """file -> file.1 -> ... -> file.N (the oldest dropped); with no backups the file starts over."""
        f.close()
        path = self.log_dir / file_name(source)
        for i in range(self.backups - 1, 0, -1):
            older = path.with_name(f'{path.name}.{i}')
            if older.exists():
                os.replace(older, path.with_name(f'{path.name}.{i + 1}'))
        if self.backups > 0:
            os.replace(path, path.with_name(f'{path.name}.1'))
        new = path.open('wb')
        self._open[source] = (new, 0)
        return new, 0


class _ServiceHandler(logging.Handler):
    def __init__(self, service: LogService) -> None:
        super().__init__()
        self.service = service

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            level = level if level in _LEVEL_RANK else ('error' if record.levelno >= logging.ERROR else 'info')
            model = getattr(record, 'model', None)
            self.service.add('app', record.getMessage(), level, model=model, logger=record.name)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)
