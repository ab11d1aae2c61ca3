"""Logs: the app's own `logging` records and every llama-server line, in one ring buffer, published as events."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
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
    def __init__(self, bus: EventBus, capacity: int = 10_000) -> None:
        self.bus = bus
        self._buf: deque[LogRecord] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, source: str, message: str, level: str = 'info', model: str | None = None, logger: str | None = None):
        rec = LogRecord(next(self._seq), time.time(), level, source, message.rstrip('\n'), model, logger)
        with self._lock:
            self._buf.append(rec)
        self.bus.publish('logs', 'line', rec.as_dict())
        return rec

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
