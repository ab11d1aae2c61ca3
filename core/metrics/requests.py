"""Proxy figures from the `requests` events (one per finished request): rate, errors and latency over a minute.

The proxy publishes `model`, `route`, `status`, `duration` (seconds), `ttft` and `tokens`; this module reads
only the event, never the proxy, so the two stay independent.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from core.proxy.activity import CLIENT_CLOSED, is_failure

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    ts: float
    model: str
    route: str
    status: str
    duration_s: float | None
    ttft_s: float | None
    error: bool
    upstream: str = 'local'  # the remote that served it (core/remotes), or this app's own llama-server


def seconds(data: dict[str, Any], *names: str) -> float | None:
    """The first of `names` present, in seconds (a name ending in `_ms` is taken as milliseconds)."""
    for name in names:
        v = data.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v / 1000.0 if name.endswith('_ms') else float(v)
    return None


def from_event(data: dict[str, Any], ts: float) -> FinishedRequest:
    status = data.get('status')
    code = status if isinstance(status, int) else None
    if code is None and isinstance(status, str) and status.isdigit():
        code = int(status)
    cancelled = code == CLIENT_CLOSED  # stopped by its client: not a failure
    error = not cancelled and (bool(data.get('error')) or is_failure(code) or (code is None and status is not None))
    return FinishedRequest(
        ts=ts,
        model=str(data.get('model') or ''),
        route=str(data.get('route') or data.get('path') or ''),
        status=str(status if status is not None else ''),
        duration_s=seconds(data, 'duration_s', 'duration', 'duration_ms'),
        ttft_s=seconds(data, 'ttft_s', 'ttft', 'ttft_ms'),
        error=error,
        upstream=str(data.get('upstream') or 'local'),
    )


class RequestStats:
    """Counts per second over the window, and the latest durations for the median.

    Summarised once per metrics sample; kept small so that costs the same at 1 or 2 000 requests/s (copying and
    sorting a minute of requests at 1 500/s took ~25 ms of the event loop, once a second)."""

    def __init__(self, window_s: float = WINDOW_S, latencies_kept: int = 4096, started: float | None = None) -> None:
        self.window_s = window_s
        self._seconds: deque[list[int]] = deque()  # [whole second, requests, errors], oldest first
        self._durations: deque[tuple[float, float]] = deque(maxlen=latencies_kept)  # (ts, seconds)
        self.total = 0
        self.errors_total = 0
        self._started = time.time() if started is None else started  # rates over less than a window till then

    def add(self, req: FinishedRequest) -> None:
        self.total += 1
        self.errors_total += req.error
        sec = int(req.ts)
        if self._seconds and self._seconds[-1][0] == sec:
            bucket = self._seconds[-1]
        else:
            bucket = [sec, 0, 0]
            self._seconds.append(bucket)
        bucket[1] += 1
        bucket[2] += req.error
        if req.duration_s is not None:
            self._durations.append((req.ts, req.duration_s))

    def summary(self, in_flight: int | None, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        cutoff = now - self.window_s
        while self._seconds and self._seconds[0][0] < int(cutoff):
            self._seconds.popleft()
        while self._durations and self._durations[0][0] < cutoff:
            self._durations.popleft()
        count = sum(b[1] for b in self._seconds)
        span = min(self.window_s, max(1.0, now - self._started))
        durations = [d for _, d in self._durations]
        return {
            'requests_per_s': round(count / span, 4),
            'requests_last_minute': count,
            'errors_last_minute': sum(b[2] for b in self._seconds),
            'p50_latency_ms': round(statistics.median(durations) * 1000, 2) if durations else None,
            'p95_latency_ms': round(_p95(durations) * 1000, 2) if durations else None,
            'in_flight': in_flight,
            'requests_total': self.total,
            'errors_total': self.errors_total,
        }


def _p95(values: list[float]) -> float:
    ordered = sorted(values)  # nearest rank: the smallest value with at least 95 % of them at or below it
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
