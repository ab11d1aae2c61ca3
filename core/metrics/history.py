"""Metric history: the last hour at full resolution in memory, 10 s and 1 min means in SQLite for 24 h and 7 d.

A sample is flattened to named numeric series (`cpu_pct`, `gpu.0.util_pct`, `model.<id>.rss_bytes`, ...). The
ring keeps each sample as a compact float array that shares its tuple of series names with the previous sample,
so an hour at 1 Hz stays a few MB. Downsampled buckets are one JSON row each (`{series: mean}`), written when the
bucket closes and pruned past their retention, so the database stays bounded and charts survive a restart.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from core.store import Store

RING_SECONDS = 3600
# resolution (s) -> retention (s)
TIERS = {10: 24 * 3600, 60: 7 * 24 * 3600}
WINDOWS = {'5m': 300, '1h': 3600, '24h': 24 * 3600, '7d': 7 * 24 * 3600}

SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics_history (
    res INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (res, ts)
) WITHOUT ROWID;
"""


def flatten(sample: dict[str, Any]) -> dict[str, float]:
    """The numeric series of one sample (per-core CPU is left to the live view: it scales with the core count)."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)

    sysd = sample.get('system') or {}
    for k in ('cpu_pct', 'ram_pct', 'ram_used_bytes', 'ram_available_bytes', 'swap_used_bytes', 'swap_pct'):
        put(k, sysd.get(k))
    load = sysd.get('load_avg')
    if load:
        put('load_1m', load[0])
    net = sysd.get('net') or {}
    put('net_sent_bytes_per_s', net.get('sent_bytes_per_s'))
    put('net_recv_bytes_per_s', net.get('recv_bytes_per_s'))
    for d in sysd.get('disks') or []:
        put(f'disk.{d["path"]}.free_bytes', d.get('free_bytes'))
    for g in (sample.get('gpu') or {}).get('gpus') or []:
        i = g['index']
        put(f'gpu.{i}.util_pct', g.get('utilization_pct'))
        put(f'gpu.{i}.memory_used_bytes', g.get('memory_used_bytes'))
        put(f'gpu.{i}.memory_used_pct', g.get('memory_used_pct'))
        put(f'gpu.{i}.temperature_c', g.get('temperature_c'))
        put(f'gpu.{i}.power_draw_w', g.get('power_draw_w'))
    for model, m in (sample.get('models') or {}).items():
        for k in ('rss_bytes', 'cpu_pct', 'threads'):
            put(f'model.{model}.{k}', m.get(k))
        llama = m.get('llama') or {}
        for k in (
            'prompt_tokens_per_s',
            'generation_tokens_per_s',
            'requests_processing',
            'requests_deferred',
            'slots_busy',
            'kv_used_pct',
        ):
            put(f'model.{model}.{k}', llama.get(k))
    proxy = sample.get('proxy') or {}
    for k in ('requests_per_s', 'in_flight', 'errors_last_minute', 'p50_latency_ms', 'p95_latency_ms'):
        put(f'proxy.{k}', proxy.get(k))
    return out


@dataclass
class _Bucket:
    start: int
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: round(self.sums[k] / self.counts[k], 4) for k in self.sums}


MAX_PENDING = 20_000  # closed buckets held while the disk refuses them: 7 a minute (10 s and 60 s tiers), ~2 days


class History:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self._ring: deque[tuple[float, tuple[str, ...], array[float]]] = deque(maxlen=self._ring_len(interval))
        self._keys: tuple[str, ...] = ()
        self._buckets: dict[int, _Bucket] = {}
        self._pending: list[tuple[int, int, str]] = []  # closed buckets not yet written
        store.ensure_schema(SCHEMA)

    @staticmethod
    def _ring_len(interval: float) -> int:
        return max(10, math.ceil(RING_SECONDS / max(interval, 0.1)))

    def resize(self, interval: float) -> None:
        n = self._ring_len(interval)
        if n != self._ring.maxlen:
            self._ring = deque(self._ring, maxlen=n)

    # ---- writing -------------------------------------------------------------------------------------------
    def add(self, ts: float, values: dict[str, float]) -> None:
        """Record one sample (on the loop; cheap). Closed buckets queue up for `flush` (a thread)."""
        keys = tuple(values)
        if keys != self._keys:
            self._keys = keys
        self._ring.append((ts, self._keys, array('d', values.values())))
        for res in TIERS:
            start = int(ts // res * res)
            b = self._buckets.get(res)
            if b is not None and b.start != start:
                self._pending.append((res, b.start, json.dumps(b.means(), separators=(',', ':'))))
                b = None
            if b is None:
                b = self._buckets[res] = _Bucket(start)
            b.add(values)

    def flush(self, include_open: bool = False, now: float | None = None) -> None:
        """Write closed buckets (and, at shutdown, the open ones) and prune past retention. Blocking."""
        rows, self._pending = self._pending, []
        closed = len(rows)
        if include_open:
            rows += [(res, b.start, json.dumps(b.means(), separators=(',', ':'))) for res, b in self._buckets.items()]
        if rows:
            try:
                self.store.executemany('INSERT OR REPLACE INTO metrics_history (res, ts, data) VALUES (?, ?, ?)', rows)
            except Exception:
                # A full disk: keep the closed buckets for the next flush (the newest, up to a bound), so the
                # history has no hole once space returns. Open buckets are still in memory anyway.
                self._pending[:0] = rows[:closed]
                del self._pending[:-MAX_PENDING]
                raise
            now = time.time() if now is None else now
            for res, keep in TIERS.items():
                self.store.execute('DELETE FROM metrics_history WHERE res = ? AND ts < ?', (res, int(now - keep)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---- reading -------------------------------------------------------------------------------------------
    def series_names(self) -> list[str]:
        return sorted(self._keys)

    def query(self, window: str, series: list[str] | None = None, now: float | None = None) -> dict[str, Any]:
        """Points `[ts, value]` per series over `window` (5m, 1h: full resolution; 24h: 10 s; 7d: 1 min).
        `series` names exact series or prefixes ending in `*`; None means every series. Blocking (SQLite)."""
        span = WINDOWS[window]
        now = time.time() if now is None else now
        since = now - span
        want = _matcher(series)
        out: dict[str, list[list[float]]] = {}
        if span <= RING_SECONDS:
            ring = [e for e in self._ring if e[0] >= since]
            ring_start = ring[0][0] if ring else now
            # After a restart the ring is young: the older part of the window comes from the 10 s tier.
            self._from_db(10, since, ring_start, want, out)
            for ts, keys, values in ring:
                for k, v in zip(keys, values, strict=True):
                    if want(k):
                        out.setdefault(k, []).append([round(ts, 3), v])
            resolution: float | None = None if not ring else _median_step(ring)
        else:
            res = 10 if span <= TIERS[10] else 60
            self._from_db(res, since, now + 1, want, out)
            resolution = res
        return {'window': window, 'resolution_s': resolution, 'series': out}

    def _from_db(self, res: int, since: float, until: float, want: Any, out: dict[str, list[list[float]]]) -> None:
        rows = self.store.query(
            'SELECT ts, data FROM metrics_history WHERE res = ? AND ts >= ? AND ts < ? ORDER BY ts',
            (res, int(since), until),
        )
        for row in rows:
            for k, v in json.loads(row['data']).items():
                if want(k):
                    out.setdefault(k, []).append([float(row['ts']), v])

    def stored_rows(self) -> dict[int, int]:
        return {
            int(r['res']): int(r['n'])
            for r in self.store.query('SELECT res, COUNT(*) AS n FROM metrics_history GROUP BY res')
        }


def _matcher(series: list[str] | None) -> Any:
    if not series:
        return lambda k: True
    exact = {s for s in series if not s.endswith('*')}
    prefixes = tuple(s[:-1] for s in series if s.endswith('*'))
    return lambda k: k in exact or (bool(prefixes) and k.startswith(prefixes))


def _median_step(ring: list[tuple[float, Any, Any]]) -> float | None:
    if len(ring) < 2:
        return None
    steps = sorted(b[0] - a[0] for a, b in itertools.pairwise(ring))
    return round(steps[len(steps) // 2], 3)
