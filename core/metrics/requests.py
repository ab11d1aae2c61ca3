"""Proxy figures from the `requests` events (one per finished request): rate, errors and latency over a minute.

The proxy publishes `model`, `route`, `status`, `duration` (seconds), `ttft` and `tokens`; this module reads
only the event, never the proxy, so the two stay independent.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

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
    error = bool(data.get('error')) or (code is not None and code >= 400) or (code is None and status is not None)
    return FinishedRequest(
        ts=ts,
        model=str(data.get('model') or ''),
        route=str(data.get('route') or data.get('path') or ''),
        status=str(status if status is not None else ''),
        duration_s=seconds(data, 'duration_s', 'duration', 'duration_ms'),
        ttft_s=seconds(data, 'ttft_s', 'ttft', 'ttft_ms'),
        error=error,
    )


class RequestStats:
    def __init__(self, window_s: float = WINDOW_S, max_kept: int = 100_000) -> None:
        self.window_s = window_s
        self._recent: deque[FinishedRequest] = deque(maxlen=max_kept)  # bounded even under a flood
        self.total = 0
        self.errors_total = 0
        self._started = time.time()

    def add(self, req: FinishedRequest) -> None:
        self._recent.append(req)
        self.total += 1
        self.errors_total += req.error

    def summary(self, in_flight: int | None, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        cutoff = now - self.window_s
        while self._recent and self._recent[0].ts < cutoff:
            self._recent.popleft()
        recent = list(self._recent)
        span = min(self.window_s, max(1.0, now - self._started))
        durations = [r.duration_s for r in recent if r.duration_s is not None]
        return {
            'requests_per_s': round(len(recent) / span, 4),
            'requests_last_minute': len(recent),
            'errors_last_minute': sum(r.error for r in recent),
            'p50_latency_ms': round(statistics.median(durations) * 1000, 2) if durations else None,
            'in_flight': in_flight,
            'requests_total': self.total,
            'errors_total': self.errors_total,
        }
