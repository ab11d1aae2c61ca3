"""Metric history (ring + SQLite tiers: downsampling, retention, restart) and alert hysteresis."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.events import EventBus
from core.metrics.alerts import Alerts
from core.metrics.history import History
from core.settings import Settings
from core.store import Store

T0 = 1_700_000_000.0  # a round start keeps the bucket arithmetic readable


def test_downsampling_means_and_retention(tmp_path: Path) -> None:
    store = Store(tmp_path / 'h.sqlite3')
    h = History(store, interval=1.0)
    # 8 days at one sample per 5 s; the value is the minute index so every bucket's mean is known.
    step = 5
    n = 8 * 24 * 3600 // step
    for i in range(n):
        ts = T0 + i * step
        h.add(ts, {'cpu_pct': float((i * step) // 60), 'ram_pct': 50.0})
        if h.pending >= 500:
            h.flush(now=ts)
    end = T0 + (n - 1) * step
    h.flush(now=end)
    rows = h.stored_rows()
    # Retention: 24 h of 10 s rows, 7 d of 1 min rows (bounded disk whatever the uptime).
    assert 24 * 360 - 2 <= rows[10] <= 24 * 360 + 1
    assert 7 * 24 * 60 - 2 <= rows[60] <= 7 * 24 * 60 + 1
    assert len(h._ring) == 3600  # bounded memory: one hour of 1 s samples

    day = h.query('24h', ['cpu_pct'], now=end)
    assert day['resolution_s'] == 10
    pts = day['series']['cpu_pct']
    for ts, value in pts[:50]:
        assert value == (ts - T0) // 60  # 10 s buckets sit inside one minute: the mean is that minute
    week = h.query('7d', None, now=end)
    assert week['resolution_s'] == 60 and set(week['series']) == {'cpu_pct', 'ram_pct'}
    assert all(v == 50.0 for _, v in week['series']['ram_pct'])
    assert week['series']['cpu_pct'][0][0] >= end - 7 * 24 * 3600
    store.close()


def test_buckets_a_full_disk_refused_are_written_when_it_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / 'h.sqlite3')
    h = History(store, interval=1.0)
    for i in range(120):  # two minutes while the disk is full: 12 ten-second buckets and 2 one-minute ones close
        h.add(T0 + i, {'cpu_pct': float(i // 10)})
        if i % 10 == 5 and h.pending:
            with monkeypatch.context() as m:
                m.setattr(store, 'executemany', _no_space)
                with pytest.raises(OSError, match='No space'):
                    h.flush(now=T0 + i)
    h.add(T0 + 120, {'cpu_pct': 12.0})  # closes the last minute's buckets
    h.flush(now=T0 + 120)  # space is back
    assert h.stored_rows() == {10: 12, 60: 2}
    day = h.query('24h', ['cpu_pct'], now=T0 + 120)
    assert [v for _, v in day['series']['cpu_pct']] == [float(i) for i in range(12)]  # no hole
    store.close()


def _no_space(*_a: object, **_k: object) -> None:
    raise OSError(28, 'No space left on device')


def test_short_windows_use_the_ring_and_survive_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / 'h.sqlite3')
    h = History(store, interval=1.0)
    for i in range(600):
        h.add(T0 + i, {'cpu_pct': float(i), 'model.m.rss_bytes': 1e9})
    h.flush(include_open=True, now=T0 + 600)
    five = h.query('5m', ['cpu_pct', 'model.*'], now=T0 + 599)
    assert five['resolution_s'] == 1
    assert [v for _, v in five['series']['cpu_pct']] == [float(i) for i in range(299, 600)]
    assert set(five['series']) == {'cpu_pct', 'model.m.rss_bytes'}
    store.close()

    # A new process: the ring is empty, the hour comes from the 10 s tier in SQLite.
    store = Store(tmp_path / 'h.sqlite3')
    h2 = History(store, interval=1.0)
    hour = h2.query('1h', ['cpu_pct'], now=T0 + 600)
    pts = hour['series']['cpu_pct']
    assert len(pts) == 60
    assert pts[0] == [T0, pytest.approx(4.5)]  # mean of 0..9
    store.close()


def _settings(**kw: float) -> object:
    class Cfg:
        settings = Settings(**kw)

    return Cfg()


def _sample(ram: float, temp: float | None = None, free_gb: float | None = None) -> dict:
    gpus = [] if temp is None else [{'index': 0, 'temperature_c': temp, 'memory_used_pct': 10.0}]
    disks = [] if free_gb is None else [{'path': '/models', 'free_bytes': free_gb * 1e9}]
    return {'system': {'ram_pct': ram, 'disks': disks}, 'gpu': {'gpus': gpus}}


def test_alerts_have_hysteresis() -> None:
    bus = EventBus()
    got: list = []
    bus.subscribe(['alerts'], got.append)
    alerts = Alerts(_settings(alert_ram_pct=90, alert_hysteresis_pct=5), bus)
    for ram in (80, 90.5, 89, 91, 86, 88):  # hovers around 90: one alert, no flapping
        alerts.evaluate(_sample(ram))
    assert [(e.type, e.data['kind']) for e in got] == [('raised', 'ram')]
    alerts.evaluate(_sample(85.0))  # 5 % of 90 below the line: cleared
    assert [e.type for e in got] == ['raised', 'cleared']
    assert alerts.snapshot()['active'] == [] and len(alerts.snapshot()['recent']) == 1


def test_gpu_temperature_and_disk_free_alerts() -> None:
    bus = EventBus()
    got: list = []
    bus.subscribe(['alerts'], got.append)
    alerts = Alerts(_settings(alert_gpu_temp_c=80, alert_disk_free_gb=5, alert_hysteresis_pct=10), bus)
    alerts.evaluate(_sample(10, temp=82, free_gb=4))
    assert sorted(e.data['key'] for e in got) == ['disk_free:/models', 'gpu_temp:0']
    alerts.evaluate(_sample(10, temp=75, free_gb=5.4))  # 75 > 72 and 5.4 < 5.5: both still active
    assert len(alerts.active) == 2
    alerts.evaluate(_sample(10, temp=70, free_gb=6))
    assert [e.type for e in got[2:]] == ['cleared', 'cleared'] and alerts.active == {}


def test_model_failed_alert_from_state_events() -> None:
    bus = EventBus()
    got: list = []
    bus.subscribe(['alerts'], got.append)
    alerts = Alerts(_settings(), bus)
    bus.subscribe(['models'], alerts.on_model_event)
    bus.publish('models', 'state', {'model': 'm', 'state': 'starting'})
    bus.publish('models', 'state', {'model': 'm', 'state': 'failed', 'error': 'exit code 1'})
    bus.publish('models', 'state', {'model': 'm', 'state': 'failed', 'error': 'exit code 1'})
    assert [e.type for e in got] == ['raised']
    assert got[0].data['message'] == 'model m failed: exit code 1' and got[0].data['severity'] == 'error'
    bus.publish('models', 'state', {'model': 'm', 'state': 'ready'})
    assert [e.type for e in got] == ['raised', 'cleared']
