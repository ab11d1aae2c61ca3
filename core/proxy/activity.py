"""The activity recorder: one record per proxied request, in flight in memory, every row in SQLite.

Rows are written in small batches off the event loop (the relay never waits on SQLite) and the table is trimmed
to `requests_keep` rows. A request's row is queued when it starts (at `announce`, once its model is known: status
NULL) and again when it ends (`finish`: its status and figures replace the start's row); one that starts and ends
within one flush interval is written once, finished. So a crash or a kill leaves the rows of the requests it cut
short, and the next recorder, when it is built (before the app serves anything), marks those (status NULL, ids of
an earlier recorder: another id prefix) as interrupted: status `INTERRUPTED` (0: no HTTP status was recorded) and
error `INTERRUPTED_ERROR`. An interrupted request is a failure (`is_failure`, the `error` filter); the pages show
it as "interrupted".

Reads (`recent`, `query`, `facets`, `export`) see finished and interrupted rows only (status not NULL; this
process's requests in flight are `inflight()`), flush first and are meant to run off the loop too. Each start and
finish is published as a `requests` event; only finished ones carry `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import json
import logging
import operator
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
_INSTANCES = itertools.count()  # recorders built in this process (see `Activity._prefix`)
CLIENT_CLOSED = 499  # nginx's code for "client closed the request": a stop, recorded, never sent, not a failure
# The status of a request the app stopped (killed, crashed) before it ended: no HTTP status was recorded, maybe none
# was sent. Set on the rows an earlier run left unfinished when the next recorder is built; a failure.
INTERRUPTED = 0
INTERRUPTED_ERROR = 'interrupted: the app stopped before the request ended'


def is_failure(status: int | None) -> bool:
    """What counts as an error in the figures: a 4xx/5xx answer or an interrupted request, not a request its
    client stopped (nor one still in flight: None)."""
    return status is not None and (status == INTERRUPTED or (status >= 400 and status != CLIENT_CLOSED))


STATS_WINDOW_S = 60.0
LAST_KEPT = 50
FACETS = ('model', 'upstream', 'route', 'status')
MAX_UNWRITTEN = 10_000  # rows kept in memory while SQLite cannot be written (a full disk)
QUERY_LIMIT = 10_000  # rows per page of a query
EXPORT_LIMIT = 1_000_000  # an export is bounded by `requests_keep` in practice; this only caps a runaway setting

SCHEMA = """
CREATE TABLE IF NOT EXISTS proxy_requests (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    client TEXT,
    model TEXT,
    upstream TEXT,
    route TEXT,
    method TEXT,
    status INTEGER,
    stream INTEGER,
    ttft_s REAL,
    duration_s REAL,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    prompt_tps REAL,
    gen_tps REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS proxy_requests_ts ON proxy_requests (ts);
CREATE INDEX IF NOT EXISTS proxy_requests_model ON proxy_requests (model, ts);
CREATE INDEX IF NOT EXISTS proxy_requests_open ON proxy_requests (id) WHERE status IS NULL;
"""


CARRIED = 'lap.record'  # scope key: the record of a request the fast lane began and handed to the ASGI path


class Cancellable(Protocol):
    """What serves a request in flight, for an operator's cancel: its task, or a fast-lane request."""

    def done(self) -> bool: ...

    def cancel(self) -> Any: ...


@dataclass(slots=True)
class RequestRecord:
    id: str
    ts: float
    client: str
    route: str
    method: str
    model: str | None = None
    upstream: str | None = None  # the remote that served it (core/remotes); None: this app's own llama-server
    status: int | None = None
    stream: bool = False
    ttft_s: float | None = None
    duration_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    error: str | None = None
    # Not stored: monotonic start, what serves it (a task, or a fast-lane request: for cancel), whether its start
    # was published.
    t0: float = field(default_factory=time.perf_counter)
    task: Cancellable | None = None
    cancelled_by: str | None = None
    announced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}

    def mark_first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = round(time.perf_counter() - self.t0, 4)


COLUMNS = tuple(f.name for f in fields(RequestRecord) if f.name not in ('t0', 'task', 'cancelled_by', 'announced'))
_INSERT = f'INSERT OR REPLACE INTO proxy_requests ({", ".join(COLUMNS)}) VALUES ({", ".join("?" * len(COLUMNS))})'
_values = operator.attrgetter(*COLUMNS)  # a record's row as a tuple in COLUMNS order, in one C call
_STATUS = COLUMNS.index('status')
_FINISHED = 'status IS NOT NULL'  # finished or interrupted: what reads show (NULL: in flight)


class Activity:
    def __init__(self, store: Any, bus: Any, keep: Any) -> None:
        self.store = store
        self.bus = bus
        self._keep = keep  # callable: rows to keep (read live from settings)
        self._inflight: dict[str, RequestRecord] = {}
        # Appended on the loop, drained by `flush` in a thread: deque's append and popleft are atomic, so no row is
        # dropped between the two (swapping a list is not: an append can land in the list just written). A finished
        # row is a tuple of its values; a start is the record itself (see `_start_row`).
        self._pending: deque[tuple[Any, ...] | RequestRecord] = deque()
        self._ids = itertools.count(1)
        # Ids: req-<prefix>-<n>. The prefix tells this recorder's rows from those of earlier ones (see
        # `mark_interrupted`): start time and pid, and a count when one process builds several (tests).
        n = next(_INSTANCES)
        self._prefix = f'{int(time.time()):x}{os.getpid() % 0xFFFF:04x}' + (f'x{n:x}' if n else '')
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=10_000)  # (finish ts, duration, error)
        self._last: deque[dict[str, Any]] = deque(maxlen=LAST_KEPT)  # newest finished rows, for pages: no SQLite read
        self.total = 0
        self.errors_total = 0
        self._flusher: asyncio.Task[None] | None = None
        # A read's flush waits for one already writing in another thread, so it never misses rows in transit.
        self._flush_lock = threading.Lock()
        # Filter choices (see `facets`): every finish adds to them from the start, so a row finished while the
        # first read of the table runs in a thread is not missed (it may not be in SQLite yet when that read looks).
        self._facets: dict[str, set[Any]] = {name: set() for name in FACETS}
        self._facets_read = False
        self.write_error: str | None = None  # why the history on disk is behind, while it is
        self._schema_ready = False
        self._ensure_schema()  # pages may ask for recent requests before the app has finished starting
        self.mark_interrupted()  # so their first read already shows the requests the last run cut short

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._ensure_schema()
        if not self._last:
            self._last.extend(reversed(await asyncio.to_thread(self.recent, limit=LAST_KEPT)))
        self._flusher = asyncio.create_task(self._flush_loop(), name='proxy activity flush')

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            self.store.ensure_schema(SCHEMA)
            have = {row[1] for row in self.store.query('PRAGMA table_info(proxy_requests)')}
            if 'upstream' not in have:  # a database from before remotes
                self.store.execute('ALTER TABLE proxy_requests ADD COLUMN upstream TEXT')
            self._schema_ready = True

    def mark_interrupted(self) -> int:
        """Rows still in flight (status NULL) that an earlier recorder wrote (ids without this one's prefix) get
        status `INTERRUPTED` and `INTERRUPTED_ERROR` (an error they had is kept after it). Returns how many. Run when
        the recorder is built; blocking, and quick: a partial index holds the open rows only."""
        with self._flush_lock:
            self.flush_unlocked()
            try:
                n = self.store.execute(
                    "UPDATE proxy_requests SET status = ?, error = ? || COALESCE(': ' || error, '') "
                    'WHERE status IS NULL AND id NOT LIKE ?',
                    (INTERRUPTED, INTERRUPTED_ERROR, f'req-{self._prefix}-%'),
                )
            except Exception:
                log.exception('marking interrupted requests failed')
                return 0
            if n:
                log.warning('%d request(s) were in flight when the app last stopped: recorded as interrupted', n)
                self._facets['status'].add(INTERRUPTED)
            return n

    # ---- recording -----------------------------------------------------------------------------------------
    def begin(self, client: str, route: str, method: str) -> RequestRecord:
        rec = RequestRecord(
            id=f'req-{self._prefix}-{next(self._ids)}', ts=time.time(), client=client, route=route, method=method
        )
        self._inflight[rec.id] = rec
        return rec

    def announce(self, rec: RequestRecord) -> None:
        """Publish the start once the model is known (so listeners see which model is busy), and queue its row
        (status NULL) so that a crash before `finish` leaves it to be marked interrupted. Once per record: one the
        fast lane handed back to the ASGI path (core/proxy/fastlane.py) was announced there."""
        if rec.announced:
            return
        rec.announced = True
        self._pending.append(rec)  # its row is read in the flush: nothing is copied on the loop
        self.bus.publish('requests', 'started', _started(rec))

    def finish(self, rec: RequestRecord) -> None:
        if self._inflight.pop(rec.id, None) is None:
            return  # already finished
        rec.duration_s = round(time.perf_counter() - rec.t0, 4)
        if rec.status is None:
            rec.status = 500
        error = is_failure(rec.status)
        self.total += 1
        self.errors_total += error
        self._recent.append((time.time(), rec.duration_s, error))
        row = rec.as_dict()
        self._pending.append(tuple(row.values()))  # as_dict() follows COLUMNS
        for name in FACETS:
            if row[name] is not None:
                self._facets[name].add(row[name])
        self._last.append(row)
        self.bus.publish('requests', 'finished', row)

    def latest(self, n: int = 15) -> list[dict[str, Any]]:
        """The newest `n` (at most LAST_KEPT) finished requests, newest first, from memory."""
        return list(itertools.islice(reversed(self._last), n))

    def inflight(self) -> list[dict[str, Any]]:
        now = time.perf_counter()
        return [{**r.as_dict(), 'elapsed_s': round(now - r.t0, 3)} for r in self._inflight.values()]

    def inflight_for(self, model_id: str) -> int:
        return sum(1 for r in self._inflight.values() if r.model == model_id)

    def cancel(self, request_id: str, by: str = 'operator') -> bool:
        rec = self._inflight.get(request_id)
        if rec is None or rec.task is None or rec.task.done():
            return False
        rec.cancelled_by = by
        rec.task.cancel()
        return True

    # ---- storage -------------------------------------------------------------------------------------------
    def flush(self) -> None:
        with self._flush_lock:
            self.flush_unlocked()

    def flush_unlocked(self) -> None:
        """`flush` for a caller that holds `_flush_lock`."""
        rows: list[tuple[Any, ...]] = []
        while self._pending:
            item = self._pending.popleft()
            rows.append(_start_row(item) if isinstance(item, RequestRecord) else item)
        if not rows:
            return
        # A request's finish replaces its start (same id, later in the queue): one row each, the last values.
        rows = list({row[0]: row for row in rows}.values())
        try:
            self._ensure_schema()
            self.store.executemany(_INSERT, rows)
            keep = int(self._keep())
            self.store.execute(
                'DELETE FROM proxy_requests WHERE rowid <= (SELECT MAX(rowid) FROM proxy_requests) - ?', (keep,)
            )
        except Exception as e:
            # Kept for the next flush (a full disk frees up; a locked database unlocks), within a bound.
            self._pending.extendleft(reversed(rows))
            dropped = len(self._pending) - MAX_UNWRITTEN
            for _ in range(max(0, dropped)):
                self._pending.popleft()
            if self.write_error is None:
                log.exception('writing %d request rows failed; kept to retry', len(rows))
            if dropped > 0:
                log.warning('request history: %d unwritten rows dropped (over %d kept)', dropped, MAX_UNWRITTEN)
            self.write_error = f'request history not written: {e}'
            return
        if self.write_error is not None:
            log.info('request history written again')
            self.write_error = None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self._pending:
                await asyncio.to_thread(self.flush)

    def recent(self, model: str | None = None, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Finished (and interrupted) requests, newest first. `status`: ok, error or an exact code (see `query`)."""
        return self.query(model=model, status=status, limit=limit, count=False)[0]

    def query(
        self,
        model: str | None = None,
        status: str | None = None,
        route: str | None = None,
        since: float | None = None,
        until: float | None = None,
        upstream: str | None = None,
        offset: int = 0,
        limit: int = 50,
        count: bool = True,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of finished (and interrupted) requests matching every filter, newest first, and how many match
        in all (-1 when `count` is off). `status`: ok (1-399), error (`is_failure`: >= 400 but 499, and
        interrupted: 0) or an exact code; `since`/`until`: Unix times, inclusive. Blocking: call it off the loop."""
        self.flush()
        where, args = _where(model, status, route, since, until, upstream)
        limit = max(1, min(int(limit), QUERY_LIMIT))
        rows = self.store.query(
            f'SELECT {", ".join(COLUMNS)} FROM proxy_requests{where} ORDER BY ts DESC, rowid DESC LIMIT ? OFFSET ?',
            [*args, limit, max(0, int(offset))],
        )
        total = self.store.query(f'SELECT COUNT(*) FROM proxy_requests{where}', args)[0][0] if count else -1
        return [_row(r) for r in rows], total

    def facets(self) -> dict[str, list[Any]]:
        """The models, routes and statuses that occur in the history (for filter choices). Blocking the first time:
        read from SQLite once, then kept up to date by `finish` (every Activity page asks on each redraw, and three
        DISTINCT scans of the table each time would hold the store's lock against the writer)."""
        with self._flush_lock:
            if not self._facets_read:
                self.flush_unlocked()
                sql = f'SELECT DISTINCT {{0}} FROM proxy_requests WHERE {{0}} IS NOT NULL AND {_FINISHED}'
                for name in FACETS:
                    self._facets[name].update({r[0] for r in self.store.query(sql.format(name))})
                self._facets_read = True
            # list() of a set is one C call under the GIL: safe against `finish` adding on the loop meanwhile
            return {name: sorted(list(values)) for name, values in self._facets.items()}

    def export(self, fmt: str, **filters: Any) -> bytes:
        """Every finished (or interrupted) request matching `filters` (model, status, route, since, until), newest
        first, as `csv` (a header row, then one line per request) or `json` (a list of objects). Blocking."""
        if fmt not in ('csv', 'json'):
            raise ValueError(f'unknown export format {fmt!r}; use csv or json')
        self.flush()
        where, args = _where(**filters)
        rows = [
            _row(r)
            for r in self.store.query(
                f'SELECT {", ".join(COLUMNS)} FROM proxy_requests{where} ORDER BY ts DESC, rowid DESC LIMIT ?',
                [*args, EXPORT_LIMIT],
            )
        ]
        if fmt == 'json':
            return json.dumps(rows, indent=1).encode()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator='\n')
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        return out.getvalue().encode()

    # ---- counters ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Requests/s and errors over the last minute, p50 latency, in flight, totals."""
        now = time.time()
        recent = [r for r in self._recent if r[0] >= now - STATS_WINDOW_S]
        durations = [d for _, d, _ in recent]
        return {
            'requests_per_s': round(len(recent) / STATS_WINDOW_S, 3),
            'in_flight': len(self._inflight),
            'errors_last_minute': sum(1 for r in recent if r[2]),
            'p50_latency_s': round(statistics.median(durations), 4) if durations else None,
            'requests_total': self.total,
            'errors_total': self.errors_total,
        }


def _where(
    model: str | None = None,
    status: str | None = None,
    route: str | None = None,
    since: float | None = None,
    until: float | None = None,
    upstream: str | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space) and its arguments for the history filters."""
    where: list[str] = [_FINISHED]  # rows in flight (this process's) are not history yet
    args: list[Any] = []
    if upstream == 'local':  # served by this app's own llama-servers
        where.append('upstream IS NULL')
    for column, value in (('model', model), ('route', route), ('upstream', None if upstream == 'local' else upstream)):
        if value:
            where.append(f'{column} = ?')
            args.append(value)
    if status == 'ok':
        where.append('status BETWEEN 1 AND 399')
    elif status == 'error':  # failures, as `is_failure` counts them: a stop by its client (499) is not one
        where.append(f'(status = {INTERRUPTED} OR (status >= 400 AND status != {CLIENT_CLOSED}))')
    elif status:
        where.append('status = ?')
        args.append(int(status))
    if since is not None:
        where.append('ts >= ?')
        args.append(float(since))
    if until is not None:
        where.append('ts <= ?')
        args.append(float(until))
    return ' WHERE ' + ' AND '.join(where), args


def _row(r: Any) -> dict[str, Any]:
    return {**dict(r), 'stream': bool(r['stream'])}


def _start_row(rec: RequestRecord) -> tuple[Any, ...]:
    """The row of a request in flight, read in the flush thread while the loop may be filling its figures in: the
    status is written NULL whatever it holds by now (the request has not ended until `finish` queues its row, which
    comes later in the queue and replaces this one), the figures are whatever they are this moment."""
    values = _values(rec)
    return (*values[:_STATUS], None, *values[_STATUS + 1 :])


def _started(rec: RequestRecord) -> dict[str, Any]:
    return {
        'id': rec.id,
        'ts': rec.ts,
        'client': rec.client,
        'model': rec.model,
        'route': rec.route,
        'method': rec.method,
        'stream': rec.stream,
    }


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: model names and errors come from clients, and a cell starting
    with = + - @ (or a tab/CR) is a formula to Excel and LibreOffice."""
    if isinstance(value, str) and value[:1] in ('=', '+', '-', '@', '\t', '\r'):
        return "'" + value
    return value
