"""Monitoring: charts from the metrics history over a chosen window, growing live from the one shared sampler (each
tab only appends the new point)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nicegui import ui

from ui.components.live_chart import LiveChart
from ui.layout import page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

WINDOWS = {'5m': '5 min', '1h': '1 hour', '24h': '24 hours', '7d': '7 days'}
WINDOW_S = {'5m': 300, '1h': 3600, '24h': 86400, '7d': 604800}
SYSTEM_SERIES = {'cpu_pct': 'CPU %', 'ram_pct': 'RAM %', 'swap_pct': 'Swap %'}
LATENCY = {'proxy.p50_latency_ms': 'p50', 'proxy.p95_latency_ms': 'p95'}


def _model_label(key: str) -> str:
    # model.<id>.<metric>
    parts = key.split('.')
    return '.'.join(parts[1:-1]) if len(parts) > 2 else key


def _gpu_label(key: str) -> str:
    # gpu.<index>.<metric>
    parts = key.split('.')
    return f'GPU {parts[1]}' if len(parts) > 2 else key


def pick(values: dict[str, Any], prefix: str, suffix: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k.startswith(prefix) and k.endswith(suffix)}


def exact(values: dict[str, Any], names: Any) -> dict[str, Any]:
    return {k: values[k] for k in names if k in values}


def mib(values: dict[str, Any]) -> dict[str, Any]:
    """Bytes as MiB, for points (lists of [ts, v]) or for one sample's values."""
    return {k: [[t, x / 2**20] for t, x in v] if isinstance(v, list) else v / 2**20 for k, v in values.items()}


def register(system: System) -> None:
    from core.metrics.history import flatten

    @page(system, '/monitoring', 'Monitoring')
    async def monitoring() -> None:
        with ui.row().classes('items-center gap-4 w-full flex-wrap'):
            window = ui.toggle(WINDOWS, value='5m').props('dense no-caps').mark('window')
            ui.label(
                f'Sampled every {system.config.settings.metrics_interval:g} s by one shared sampler; '
                'the 5 min and 1 hour views grow live.'
            ).classes('lap-muted text-sm')
        gpu_note = ui.label().classes('text-sm lap-muted').mark('gpu-status')
        sample = system.metrics.latest or {}
        has_gpu = bool((sample.get('gpu') or {}).get('available'))
        # (chart, from history or a sample's flattened values -> the chart's series)
        charts: list[tuple[LiveChart, Callable[[dict[str, Any]], dict[str, Any]]]] = []

        def chart(title: str, unit: str, select: Callable[[dict[str, Any]], dict[str, Any]], **kw: Any) -> None:
            charts.append((LiveChart(title, unit, **kw), select))

        with ui.grid().classes('grid-cols-1 lg:grid-cols-2 gap-4 w-full'):
            chart(
                'CPU and memory',
                '%',
                lambda v: exact(v, SYSTEM_SERIES),
                label=lambda k: SYSTEM_SERIES.get(k, k),
                y_range=(0, 100),
                marker='chart-system',
            )
            chart(
                'Requests/s', 'requests/s', lambda v: exact(v, ['proxy.requests_per_s']), label=lambda k: 'requests/s'
            )
            chart(
                'Latency', 'ms', lambda v: exact(v, LATENCY), label=lambda k: LATENCY.get(k, k), marker='chart-latency'
            )
            chart(
                "Generation throughput (tokens/s over each sample; a request's own speed: Activity)",
                'tokens/s',
                lambda v: pick(v, 'model.', '.generation_tokens_per_s'),
                label=_model_label,
            )
            chart(
                'Prompt tokens/s', 'tokens/s', lambda v: pick(v, 'model.', '.prompt_tokens_per_s'), label=_model_label
            )
            chart(
                'llama-server memory (RSS)', 'MiB', lambda v: mib(pick(v, 'model.', '.rss_bytes')), label=_model_label
            )
            if has_gpu:  # created only with a GPU: a hidden chart is what made plotly throw on resize
                chart(
                    'GPU utilization', '%', lambda v: pick(v, 'gpu.', '.util_pct'), label=_gpu_label, y_range=(0, 100)
                )
                chart('GPU memory used', '%', lambda v: pick(v, 'gpu.', '.memory_used_pct'), label=_gpu_label)
                chart('GPU temperature', '°C', lambda v: pick(v, 'gpu.', '.temperature_c'), label=_gpu_label)
                chart('GPU power', 'W', lambda v: pick(v, 'gpu.', '.power_draw_w'), label=_gpu_label)

        def show_gpu(sample: dict[str, Any]) -> None:
            g = sample.get('gpu') or {}
            if g.get('available'):
                names = ', '.join(x.get('name') or '?' for x in g.get('gpus') or [])
                gpu_note.set_text(f'GPUs: {names}')
            else:
                gpu_note.set_text(g.get('message') or 'no NVIDIA GPU detected')

        loads = {'n': 0}

        async def load(win: str) -> None:
            loads['n'] += 1
            mine = loads['n']
            history = await system.metrics.history_query(win, None)
            if mine != loads['n']:  # the window was changed again meanwhile: that answer is the one to draw
                return
            series = history['series']
            for c, select in charts:
                c.max_points = max(300, WINDOW_S[win] // max(1, int(system.config.settings.metrics_interval)))
                c.seed(select(series))

        if sample:
            show_gpu(sample)
        await load('5m')
        window.on_value_change(lambda e: load(e.value))

        def on_sample(event: Event) -> None:
            show_gpu(event.data)
            if window.value not in ('5m', '1h'):  # the long windows are averages: they do not grow per sample
                return
            values = flatten(event.data)
            for c, select in charts:
                c.extend(event.data['ts'], select(values))

        subscribe(system, ['metrics'], on_sample)
