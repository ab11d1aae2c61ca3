"""Logs: the app's own `logging` records and every llama-server line, in one ring buffer, published as events,
and written to a rotating file per source in the data dir (by a background thread, so the loop never waits on disk).
"""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# llama.cpp prefixes some lines with a level letter ("E ", "W ", "I ") or tags like "srv  ... error".
_LLAMA_LEVEL = re.compile(r'^(?:\d+\.\d+\.\d+\.\d+\s+)?([DIWE])\s')


def llama_line_level(line: str) -> str:
    m = _LLAMA_LEVEL.match(line)
    if m:
        return {'D': 'debug', 'I': 'info', 'W': 'warning', 'E': 'error'}[m.group(1)]
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
        self._files: _SourceFiles | None = None
        self._queue: queue.Queue[Any] | None = None
        self._listener: logging.handlers.QueueListener | None = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._files = _SourceFiles(log_dir, max_bytes, backups)
            self._queue = queue.Queue()
            self._listener = logging.handlers.QueueListener(self._queue, self._files)
            self._listener.start()

    def add(
        self, source: str, message: str, level: str = 'info', model: str | None = None, logger: str | None = None
    ) -> LogRecord:
        rec = LogRecord(next(self._seq), time.time(), level, source, message.rstrip('\n'), model, logger)
        with self._lock:
            self._buf.append(rec)
        if self._queue is not None:
            self._queue.put_nowait(rec)
        self.bus.publish('logs', 'line', rec.as_dict())
        return rec

    # ---- files ---------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every line added so far is on disk (blocking; call off the event loop)."""
        if self._queue is not None and self._listener is not None:
            self._queue.join()
            if self._files is not None:
                self._files.flush()

    def close(self) -> None:
        """Write what is queued and close the files; later lines stay in memory only."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()  # drains the queue first
        self._queue = None
        if self._files is not None:
            self._files.close()

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


def format_line(rec: LogRecord) -> str:
    stamp = time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(rec.ts)) + f'.{int(rec.ts % 1 * 1000):03d}'
    where = f' [{rec.model}]' if rec.model else (f' [{rec.logger}]' if rec.logger else '')
    return f'{stamp} {rec.level.upper():7}{where} {rec.message}'


class _SourceFiles(logging.Handler):
    """Runs on the queue listener's thread: one `RotatingFileHandler` per source, opened on first use."""

    def __init__(self, log_dir: Path, max_bytes: int, backups: int) -> None:
        super().__init__()
        self.log_dir, self.max_bytes, self.backups = log_dir, max_bytes, backups
        self._handlers: dict[str, logging.handlers.RotatingFileHandler] = {}

    def handle(self, record: Any) -> bool:  # type: ignore[override]
        # The queue carries our LogRecord dataclass, not logging.LogRecord.
        try:
            h = self._handlers.get(record.source)
            if h is None:
                h = logging.handlers.RotatingFileHandler(
                    self.log_dir / file_name(record.source),
                    maxBytes=self.max_bytes,
                    backupCount=self.backups,
                    encoding='utf-8',
                    delay=True,
                )
                h.setFormatter(logging.Formatter('%(message)s'))
                self._handlers[record.source] = h
            h.handle(logging.makeLogRecord({'msg': format_line(record), 'levelno': logging.INFO}))
        except Exception:  # a full disk must not take the app down; the ring buffer still has the line
            pass
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() is overridden
        pass

    def flush(self) -> None:
        for h in list(self._handlers.values()):
            h.flush()

    def close(self) -> None:
        for h in list(self._handlers.values()):
            h.close()
        self._handlers.clear()
        super().close()


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
