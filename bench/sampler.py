"""Metrics sampler cost: CPU per sample with 0 and 4 real llama-servers running (tiny generated models), and the
memory an hour of samples takes. Target: under 1 % of one core at 1 Hz. Writes `## Metrics sampler` in
docs/BENCHMARKS.md.

    .venv/bin/python bench/sampler.py [--seconds 30] [--burst 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section
from core.llama_binary import BinaryResolver
from core.metrics.history import History, flatten
from core.settings import SettingsManager
from core.store import Store
from core.system import System
from tests.conftest import start_llama_server, stop_process
from tests.gguf_factory import write_tiny_gguf
from tests.metrics_helpers import stand_in_running

SECTION = '## Metrics sampler'


async def measure(system: System, seconds: float, burst: int) -> dict[str, float]:
    """Run the real sampler task at 1 Hz for `seconds` (process CPU over that time), then `burst` samples back
    to back (CPU per sample). The process does nothing else, so its CPU time is the sampler's."""
    m = system.metrics
    await m.sample_once()  # warm: NVML init, HTTP client, psutil priming
    taken0, cpu0, t0 = m.samples_taken, time.process_time(), time.perf_counter()
    await m.start()
    await asyncio.sleep(seconds)
    await m.stop()
    cpu_1hz = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    ticks = m.samples_taken - taken0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(burst):
        await m.sample_once()
    per_sample_cpu = (time.process_time() - cpu0) / burst
    per_sample_wall = (time.perf_counter() - t0) / burst
    return {
        'ticks': ticks,
        'core_pct_at_1hz': 100 * cpu_1hz / wall,
        'cpu_ms_per_sample': 1000 * per_sample_cpu,
        'wall_ms_per_sample': 1000 * per_sample_wall,
    }


def hour_of_samples(template: dict[str, Any], tmp: Path) -> dict[str, float]:
    """Memory held by the history after 3600 samples at 1 Hz shaped like `template`, and the rows written."""
    store = Store(tmp / 'mem.sqlite3')
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    history = History(store, interval=1.0)
    values = flatten(template)
    t0 = 1_700_000_000.0
    for i in range(3600):
        # Vary the values so nothing is shared by accident.
        history.add(t0 + i, {k: v + i for k, v in values.items()})
        if history.pending:
            history.flush(now=t0 + i)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rows = history.stored_rows()
    db_bytes = sum(p.stat().st_size for p in tmp.glob('mem.sqlite3*'))
    store.close()
    return {
        'series': len(values),
        'ring_mib': held / 2**20,
        'rows_10s': rows.get(10, 0),
        'rows_1m': rows.get(60, 0),
        'db_kib': db_bytes / 1024,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--seconds', type=float, default=30)
    ap.add_argument('--burst', type=int, default=200)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        binary = BinaryResolver(_Cfg(tmp), tmp / 'bin').resolve()
        assert binary is not None, 'llama-server not found'
        models = [write_tiny_gguf(tmp / f'tiny-{i}.gguf', name=f'tiny-{i}', seed=i + 1) for i in range(4)]
        config = SettingsManager(config_path=tmp / 'c.json', cli={'data_dir': tmp / 'data', 'models_dirs': [tmp]})
        system = System(config)
        results: dict[str, Any] = {}
        results['0 models'] = await measure(system, args.seconds, args.burst)
        servers = {}
        try:
            for i, model in enumerate(models):
                servers[f'tiny-{i}'] = start_llama_server(binary, model, '-t', '1')
            stand_in_running(system, servers)
            results['4 models'] = await measure(system, args.seconds, args.burst)
            template = system.metrics.latest or {}
        finally:
            for s in servers.values():
                stop_process(s.proc)
            system.logs.close()
            system.store.close()
        memory = hour_of_samples(template, tmp)

    lines = [
        SECTION,
        '',
        f'Command: `.venv/bin/python bench/sampler.py --seconds {args.seconds:g} --burst {args.burst}` '
        f'({platform.machine()}, {_cpu_count()} cores, Python {platform.python_version()}; shared, noisy machine).',
        "The sampler is the real `MetricsService` task: psutil system figures, each llama-server's process stats,",
        '`/metrics` + `/slots` scraped over HTTP, NVML (absent here: one cached failed init), history, alerts.',
        'Real llama-servers on tiny generated models (`-t 1`), idle. Target: < 1 % of one core at 1 Hz.',
        '',
        '| running models | % of one core at 1 Hz | CPU ms / sample | wall ms / sample | ticks |',
        '|---|---|---|---|---|',
    ]
    for name, r in results.items():
        lines.append(
            f'| {name} | {r["core_pct_at_1hz"]:.2f} % | {r["cpu_ms_per_sample"]:.2f} | '
            f'{r["wall_ms_per_sample"]:.2f} | {r["ticks"]} |'
        )
    lines += [
        '',
        f'One hour of 1 Hz samples with 4 models ({memory["series"]} series each): the in-memory ring holds '
        f'{memory["ring_mib"]:.2f} MiB (tracemalloc); SQLite got {memory["rows_10s"]} 10 s rows and '
        f'{memory["rows_1m"]} 1 min rows ({memory["db_kib"]:.0f} KiB incl. WAL). Retention caps the tiers at '
        '8 640 (24 h) and 10 080 (7 d) rows.',
        '',
    ]
    text = '\n'.join(lines)
    print(text)
    write_section(SECTION, text)


class _Cfg:
    def __init__(self, tmp: Path) -> None:
        from core.settings import Settings

        self.settings = Settings(data_dir=tmp / 'd')


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == '__main__':
    asyncio.run(main())
