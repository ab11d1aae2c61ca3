"""Every number and time on screen is formatted here, so the pages say the same thing the same way."""

from __future__ import annotations

import time
from typing import Any

DASH = '—'  # shown for a value not measured (yet), never a made-up zero


def human_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    size = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(size) < 1024 or unit == 'TiB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024
    return f'{n} B'


def human_count(n: int | None) -> str:
    """Parameter counts: 1.1B, 350.0M; nothing known is a dash."""
    if not n:
        return DASH
    for div, suffix in ((1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
        if n >= div:
            return f'{n / div:.1f}{suffix}'
    return str(n)


def ms(seconds: float | None) -> str:
    """A duration in seconds as whole milliseconds (under 10 ms with one decimal)."""
    if seconds is None:
        return DASH
    value = seconds * 1000
    return f'{value:.1f} ms' if value < 10 else f'{value:.0f} ms'


def uptime(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = int(seconds)
    if s < 60:
        return f'{s} s'
    if s < 3600:
        return f'{s // 60} min {s % 60} s'
    if s < 86400:
        return f'{s // 3600} h {s % 3600 // 60} min'
    return f'{s // 86400} d {s % 86400 // 3600} h'


def clock(ts: float | None, *, date: bool = False) -> str:
    if not ts:
        return DASH
    return time.strftime('%Y-%m-%d %H:%M:%S' if date else '%H:%M:%S', time.localtime(ts))


def pct(value: Any) -> str:
    return DASH if not isinstance(value, (int, float)) else f'{value:.0f} %'


def count(n: int | None) -> str:
    """A measured count (tokens) as it is, a real zero included; not measured is a dash."""
    return DASH if n is None else str(n)


def rate(value: Any, unit: str = 'tok/s') -> str:
    return DASH if not isinstance(value, (int, float)) else f'{value:.1f} {unit}'
