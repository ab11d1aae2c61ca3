"""Monitoring: live charts fed by the one shared metrics sampler (each tab only appends the new point)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from nicegui import ui

from ui.components.live_chart import LiveChart
from ui.layout import page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

SYSTEM_SERIES = {'cpu_pct': 'CPU %', 'ram_pct': 'RAM %', 'swap_pct': 'Swap %'}


def _model_label(key: str) -> str:
    # model.<id>.<metric>
    parts = key.split('.')
    return '.'.join(parts[1:-1]) if len(parts) > 2 else key


def pick(values: dict[str, float], prefix: str, suffix: str) -> dict[str, float]:
    return {k: v for k, v in values.items() if k.startswith(prefix) and k.endswith(suffix)}


def register(system: System) -> None:
    from core.metrics.history import flatten

    @page(system, '/monitoring', 'Monitoring')
    async def monitoring() -> None:
        ui.label(
            f'Sampled every {system.config.settings.metrics_interval:g} s by one shared sampler; '
            'charts show the last 5 minutes and grow live.'
        ).classes('text-gray-600')
        gpu_note = ui.label().classes('text-sm text-gray-600').mark('gpu-status')
        with ui.grid(columns=2).classes('w-full gap-4'):
            cpu = LiveChart(
                'CPU and memory', '%', lambda k: SYSTEM_SERIES.get(k, k), y_range=(0, 100), marker='chart-system'
            )
            gen = LiveChart('Generation tokens/s', 'tokens/s', _model_label)
            prompt = LiveChart('Prompt tokens/s', 'tokens/s', _model_label)
            rss = LiveChart('llama-server memory (RSS)', 'MiB', _model_label)
            proxy = LiveChart('Proxy', 'value', lambda k: k.removeprefix('proxy.'))
            gpu = LiveChart('GPU utilization and memory', '%', lambda k: k.removeprefix('gpu.'), y_range=(0, 100))
        # Without a GPU its chart would only be an empty frame: the status line above says why.
        gpu.plot.bind_visibility_from(gpu_note, 'text', backward=lambda t: t.startswith('GPUs:'))
        history = await asyncio.to_thread(system.metrics.history.query, '5m')
        series = history['series']
        cpu.seed({k: v for k, v in series.items() if k in SYSTEM_SERIES})
        gen.seed(pick(series, 'model.', '.generation_tokens_per_s'))
        prompt.seed(pick(series, 'model.', '.prompt_tokens_per_s'))
        rss.seed({k: [[t, v / 2**20] for t, v in pts] for k, pts in pick(series, 'model.', '.rss_bytes').items()})
        proxy.seed({k: v for k, v in series.items() if k in ('proxy.requests_per_s', 'proxy.in_flight')})
        gpu.seed({k: v for k, v in series.items() if k.startswith('gpu.') and k.endswith('_pct')})

        def show_gpu(sample: dict[str, Any]) -> None:
            g = sample.get('gpu') or {}
            if g.get('available'):
                names = ', '.join(x.get('name') or '?' for x in g.get('gpus') or [])
                gpu_note.set_text(f'GPUs: {names}')
            else:
                gpu_note.set_text(g.get('message') or 'no NVIDIA GPU detected')

        if system.metrics.latest:
            show_gpu(system.metrics.latest)

        def on_sample(event: Event) -> None:
            sample = event.data
            values = flatten(sample)
            ts = sample['ts']
            show_gpu(sample)
            cpu.extend(ts, {k: values[k] for k in SYSTEM_SERIES if k in values})
            gen.extend(ts, pick(values, 'model.', '.generation_tokens_per_s'))
            prompt.extend(ts, pick(values, 'model.', '.prompt_tokens_per_s'))
            rss.extend(ts, {k: v / 2**20 for k, v in pick(values, 'model.', '.rss_bytes').items()})
            proxy.extend(ts, {k: values[k] for k in ('proxy.requests_per_s', 'proxy.in_flight') if k in values})
            gpu.extend(ts, {k: v for k, v in values.items() if k.startswith('gpu.') and k.endswith('_pct')})

        subscribe(system, ['metrics'], on_sample)
