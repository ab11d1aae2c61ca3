"""Threshold alerts with hysteresis: raised when a value crosses its threshold, cleared only once it is back
inside by `alert_hysteresis_pct` of the threshold, so a value hovering at the line does not flap.

Rules: RAM %, each GPU's memory % and temperature, free space of each models dir, and a model entering `failed`
(from `models` events of type `state`; cleared when that model reaches any other state). Every change is
published on the `alerts` topic and logged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from core.events import Event, EventBus

log = logging.getLogger(__name__)

GB = 1_000_000_000


@dataclass
class Alert:
    key: str  # stable identity, e.g. 'gpu_temp:0'
    kind: str  # ram | gpu_memory | gpu_temp | disk_free | model_failed
    message: str
    value: float | None
    threshold: float | None
    raised_at: float
    cleared_at: float | None = None
    model: str | None = None
    severity: str = 'warning'

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Reading:
    key: str
    kind: str
    value: float
    threshold: float
    above: bool  # True: alert when value >= threshold; False: when value <= threshold
    label: str
    unit: str


class Alerts:
    def __init__(self, config: Any, bus: EventBus, keep: int = 200) -> None:
        self.config = config
        self.bus = bus
        self.active: dict[str, Alert] = {}
        self.recent: deque[Alert] = deque(maxlen=keep)

    def evaluate(self, sample: dict[str, Any]) -> None:
        s = self.config.settings
        hyst = s.alert_hysteresis_pct / 100.0
        seen: set[str] = set()
        for r in self._readings(sample, s):
            seen.add(r.key)
            current = self.active.get(r.key)
            if r.above:
                crossed = r.value >= r.threshold
                recovered = r.value < r.threshold * (1 - hyst)
            else:
                crossed = r.value <= r.threshold
                recovered = r.value > r.threshold * (1 + hyst)
            if current is None and crossed:
                self._raise(
                    Alert(
                        r.key,
                        r.kind,
                        f'{r.label} at {_fmt(r.value, r.unit)} (threshold {_fmt(r.threshold, r.unit)})',
                        r.value,
                        r.threshold,
                        time.time(),
                    )
                )
            elif current is not None:
                current.value = r.value
                if recovered:
                    self._clear(current, f'{r.label} back to {_fmt(r.value, r.unit)}')
        # A GPU or disk that disappeared cannot stay alarmed forever.
        for key, alert in list(self.active.items()):
            if alert.kind != 'model_failed' and key not in seen:
                self._clear(alert, f'{alert.kind} no longer measured')

    def on_model_event(self, event: Event) -> None:
        if event.type != 'state':
            return
        model = event.data.get('model')
        state = event.data.get('state')
        if not model:
            return
        key = f'model_failed:{model}'
        if state == 'failed':
            if key not in self.active:
                error = event.data.get('error') or 'no reason given'
                self._raise(
                    Alert(
                        key,
                        'model_failed',
                        f'model {model} failed: {error}',
                        None,
                        None,
                        time.time(),
                        model=model,
                        severity='error',
                    )
                )
        elif key in self.active:
            self._clear(self.active[key], f'model {model} is {state}')

    def snapshot(self) -> dict[str, Any]:
        return {
            'active': [a.as_dict() for a in self.active.values()],
            'recent': [a.as_dict() for a in reversed(self.recent)],
        }

    def rules(self) -> dict[str, float]:
        s = self.config.settings
        return {
            'ram_pct': s.alert_ram_pct,
            'gpu_memory_pct': s.alert_gpu_memory_pct,
            'gpu_temp_c': s.alert_gpu_temp_c,
            'disk_free_gb': s.alert_disk_free_gb,
            'hysteresis_pct': s.alert_hysteresis_pct,
        }

    def _raise(self, alert: Alert) -> None:
        self.active[alert.key] = alert
        self.recent.append(alert)
        log.warning('alert: %s', alert.message, extra={'model': alert.model})
        self.bus.publish('alerts', 'raised', alert.as_dict())

    def _clear(self, alert: Alert, why: str) -> None:
        self.active.pop(alert.key, None)
        alert.cleared_at = time.time()
        log.info('alert cleared: %s (%s)', alert.message, why, extra={'model': alert.model})
        self.bus.publish('alerts', 'cleared', {**alert.as_dict(), 'reason': why})

    @staticmethod
    def _readings(sample: dict[str, Any], s: Any) -> list[_Reading]:
        out: list[_Reading] = []
        sysd = sample.get('system') or {}
        if isinstance(sysd.get('ram_pct'), (int, float)):
            out.append(_Reading('ram', 'ram', sysd['ram_pct'], s.alert_ram_pct, True, 'RAM use', '%'))
        for g in (sample.get('gpu') or {}).get('gpus') or []:
            i, name = g['index'], f'GPU {g["index"]}'
            if g.get('memory_used_pct') is not None:
                out.append(
                    _Reading(
                        f'gpu_memory:{i}',
                        'gpu_memory',
                        g['memory_used_pct'],
                        s.alert_gpu_memory_pct,
                        True,
                        f'{name} memory',
                        '%',
                    )
                )
            if g.get('temperature_c') is not None:
                out.append(
                    _Reading(
                        f'gpu_temp:{i}',
                        'gpu_temp',
                        g['temperature_c'],
                        s.alert_gpu_temp_c,
                        True,
                        f'{name} temperature',
                        '°C',
                    )
                )
        if s.alert_disk_free_gb > 0:
            for d in sysd.get('disks') or []:
                if d.get('free_bytes') is not None:
                    out.append(
                        _Reading(
                            f'disk_free:{d["path"]}',
                            'disk_free',
                            d['free_bytes'] / GB,
                            s.alert_disk_free_gb,
                            False,
                            f'free space on {d["path"]}',
                            ' GB',
                        )
                    )
        return out


def _fmt(v: float, unit: str) -> str:
    return f'{v:.1f}{unit}'
