"""Exercise the NVML path for real on a machine with an NVIDIA GPU: print what core/gpu.py reads, take one
sampler tick through MetricsService, check the values are sane. Exits 1 on any failed check, 2 without NVML.

    .venv/bin/python bench/gpu_check.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import gpu

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f'  [{"ok" if ok else "FAIL"}] {what}')
    if not ok:
        failures.append(what)


def check_gpu(g: gpu.GpuInfo) -> None:
    print(f'GPU {g.index}: {g.name}')
    print(json.dumps(g.as_dict(), indent=2, default=str))
    check(bool(g.name), 'name read')
    check(g.memory_total_bytes is not None and g.memory_total_bytes > 1 << 30, 'memory total > 1 GiB')
    if g.memory_total_bytes and g.memory_used_bytes is not None and g.memory_free_bytes is not None:
        check(0 <= g.memory_used_bytes <= g.memory_total_bytes, 'memory used within total')
        slack = abs(g.memory_total_bytes - g.memory_used_bytes - g.memory_free_bytes)
        check(slack <= 0.05 * g.memory_total_bytes, 'used + free ~= total (reserved memory aside)')
    check(g.utilization_pct is not None and 0 <= g.utilization_pct <= 100, 'utilization in 0..100')
    check(g.temperature_c is not None and 0 < g.temperature_c < 120, 'temperature in 0..120 °C')
    check(g.power_draw_w is not None and g.power_draw_w > 0, 'power draw > 0 W')
    if g.power_draw_w is not None and g.power_limit_w:
        check(g.power_draw_w <= g.power_limit_w * 1.5, 'power draw within 1.5x the limit')
    check(g.fan_pct is None or 0 <= g.fan_pct <= 100, 'fan in 0..100 % or not supported (data-centre GPUs)')
    print(f'  fields NVML could not read: {g.errors or "none"}')


async def sampler_tick() -> None:
    from core.settings import SettingsManager
    from core.system import System

    with tempfile.TemporaryDirectory() as tmp:
        config = SettingsManager(config_path=Path(tmp) / 'config.json', cli={'data_dir': Path(tmp) / 'data'})
        system = System(config)
        try:
            t0 = time.perf_counter()
            sample = await system.metrics.sample_once()
            took = (time.perf_counter() - t0) * 1000
            section = sample['gpu']
            print(f'sampler tick: {took:.1f} ms wall; gpu section:')
            print(json.dumps({k: v for k, v in section.items() if k != 'gpus'}, indent=2))
            check(section['available'] is True, 'sampler sees the GPU')
            check(len(section['gpus']) == len(gpu.gpus()), 'sampler reports every GPU')
            text = system.metrics.prometheus_text().decode()
            check('lap_gpu_memory_total_bytes{' in text, 'Prometheus text carries GPU figures')
            check(took < 1000, 'one tick under a second')
        finally:
            await system.metrics.stop()
            system.logs.close()
            system.store.close()


def main() -> int:
    t0 = time.perf_counter()
    ok = gpu.available()
    print(f'NVML init: {ok} ({(time.perf_counter() - t0) * 1000:.1f} ms); reason: {gpu.unavailable_reason()}')
    if not ok:
        print(gpu.NO_GPU_MESSAGE)
        return 2
    print(f'driver: {gpu._nvml.driver_version}')
    t0 = time.perf_counter()
    items = gpu.gpus()
    print(f'read {len(items)} GPU(s) in {(time.perf_counter() - t0) * 1000:.1f} ms')
    check(len(items) >= 1, 'at least one GPU')
    for g in items:
        check_gpu(g)
    free = gpu.free_vram_bytes()
    check(free is not None and free == sum(g.memory_free_bytes or 0 for g in items), 'free_vram_bytes() sums free')
    print(f'free_vram_bytes: {free}')
    asyncio.run(sampler_tick())
    gpu.shutdown()
    print('FAILED: ' + '; '.join(failures) if failures else 'all GPU checks passed')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
