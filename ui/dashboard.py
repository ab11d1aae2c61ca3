"""Dashboard: live KPIs and 5-minute sparklines from the shared sampler, GPUs, the loaded models with Unload, recent
requests with failures marked, the latest alerts and warning/error log lines. Every number is measured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from core.logs import LEVELS
from core.proxy.activity import CLIENT_CLOSED, INTERRUPTED, is_failure
from core.supervisor import ModelState, SupervisorError
from ui.components.first_run import FirstRun
from ui.components.kpi import KpiCard
from ui.components.live_chart import LiveChart
from ui.components.log_view import line_text
from ui.components.model_card import STATE_COLOR
from ui.format import DASH, clock, count, human_bytes, ms, pct, rate, uptime
from ui.layout import empty, fact, live, notify, on_reconnect, page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

RECENT = 15
REQUEST_COLUMNS = [
    {'name': 'time', 'label': 'Time', 'field': 'time', 'align': 'left'},
    {'name': 'status', 'label': 'Status', 'field': 'status'},
    {'name': 'model', 'label': 'Model', 'field': 'model', 'align': 'left'},
    {'name': 'route', 'label': 'Route', 'field': 'route', 'align': 'left'},
    {'name': 'ttft', 'label': 'TTFT', 'field': 'ttft'},
    {'name': 'duration', 'label': 'Duration', 'field': 'duration'},
    {'name': 'tokens', 'label': 'Prompt / gen tokens', 'field': 'tokens'},
    {'name': 'tps', 'label': 'Gen tok/s', 'field': 'tps'},
]
# A failed request's status in red, so a failure stands out in the list.
STATUS_SLOT = r"""
<q-td :props="props">
  <q-badge :color="props.row.cancelled ? 'grey' : props.row.failed ? 'negative' : 'positive'" :label="props.value" />
</q-td>
"""
SPARKS = {  # series in the metrics history -> (title, how to show the latest value)
    'proxy.requests_per_s': ('Requests/s', lambda v: f'{v:.2f}'),
    'generation': ('Generation tok/s', lambda v: f'{v:.1f}'),
    'cpu_pct': ('CPU', lambda v: f'{v:.0f} %'),
    'ram_pct': ('RAM', lambda v: f'{v:.0f} %'),
}


def request_row(r: dict[str, Any]) -> dict[str, Any]:
    status = r.get('status')
    return {
        'id': r.get('id'),
        'time': clock(r.get('ts')),
        'model': r.get('model') or DASH,
        'route': r.get('route') or '',
        'status': 'in flight' if status is None else 'interrupted' if status == INTERRUPTED else status,
        'failed': is_failure(status),
        'cancelled': status == CLIENT_CLOSED,
        'ttft': ms(r.get('ttft_s')),
        'duration': ms(r.get('duration_s')),
        'tokens': f'{count(r.get("prompt_tokens"))} / {count(r.get("completion_tokens"))}',
        'tps': rate(r.get('gen_tps'), ''),
    }


def generation_total(sample: dict[str, Any]) -> float | None:
    """Generation tokens/s summed over the running models; None when no model measured any."""
    tps = [(m.get('llama') or {}).get('generation_tokens_per_s') for m in (sample.get('models') or {}).values()]
    measured = [t for t in tps if isinstance(t, (int, float))]
    return sum(measured) if measured else None


def _generation_series(series: dict[str, list[list[float]]]) -> list[list[float]]:
    """Per-model generation tok/s histories summed per timestamp."""
    total: dict[float, float] = {}
    for key, points in series.items():
        if key.startswith('model.') and key.endswith('.generation_tokens_per_s'):
            for ts, v in points:
                total[ts] = total.get(ts, 0.0) + v
    return [[ts, v] for ts, v in sorted(total.items())]


def notable_lines(system: System, n: int = 6) -> list[dict[str, Any]]:
    """The app's own warnings and every error: llama-server's warning lines are routine (a cancelled task, a
    trimmed cache) and would bury the alerts."""
    app = [r.as_dict() for r in system.logs.query(level='warning', source='app', limit=n)]
    errors = [r.as_dict() for r in system.logs.query(level='error', source='llama-server', limit=n)]
    return sorted(app + errors, key=lambda d: d['seq'])[-n:]


def register(system: System) -> None:
    async def unload(model_id: str) -> None:
        client = context.client
        try:
            await system.scheduler.unload(model_id)
            notify(client, f'{model_id} stopped')
        except SupervisorError as e:
            notify(client, f'unload {model_id} failed: {e}', type='negative')

    @page(system, '/', 'Dashboard')
    async def dashboard() -> None:
        FirstRun(system)
        with ui.grid().classes('grid-cols-2 md:grid-cols-4 xl:grid-cols-8 gap-3 w-full'):
            k_loaded = KpiCard('Models loaded', 'kpi-loaded')
            k_rps = KpiCard('Requests/s (1 min)', 'kpi-rps')
            k_p50 = KpiCard('p50 latency (1 min)', 'kpi-p50')
            k_inflight = KpiCard('In flight', 'kpi-inflight')
            k_gen = KpiCard('Generation tok/s', 'kpi-gen')
            k_errors = KpiCard('Errors (1 min)', 'kpi-errors')
            k_cpu = KpiCard('CPU', 'kpi-cpu')
            k_ram = KpiCard('RAM', 'kpi-ram')
        gpu_row = ui.row().classes('gap-3 w-full flex-wrap').mark('gpu-cards')

        with ui.grid().classes('grid-cols-1 md:grid-cols-2 xl:grid-cols-4 gap-3 w-full'):
            sparks: dict[str, tuple[ui.label, LiveChart]] = {}
            for key, (title, _) in SPARKS.items():
                with ui.card().classes('gap-1 p-3'):
                    with ui.row().classes('items-baseline justify-between w-full'):
                        ui.label(f'{title} · 5 min').classes('text-xs lap-muted')
                        value = ui.label(DASH).classes('font-semibold').mark(f'spark-{key}')
                    sparks[key] = (value, LiveChart('', '', compact=True, max_points=300, marker=f'chart-{key}'))

        with ui.grid().classes('grid-cols-1 lg:grid-cols-2 gap-3 w-full'):
            with ui.card().classes('w-full'):
                ui.label('Loaded models').classes('text-lg font-medium')
                loaded_box = ui.column().classes('w-full gap-1').mark('loaded-models')
            with ui.card().classes('w-full'):
                ui.label('Alerts and warnings').classes('text-lg font-medium')
                alerts_box = ui.column().classes('w-full gap-1').mark('dashboard-alerts')

        ui.label('Recent requests').classes('text-lg font-medium')
        with ui.element('div').classes('w-full overflow-x-auto'):
            table = ui.table(columns=REQUEST_COLUMNS, rows=[], row_key='id').classes('w-full min-w-[720px]')
            table.props('dense flat').mark('recent-requests')
            table.add_slot('body-cell-status', STATUS_SLOT)
            table.add_slot('no-data', '<div class="lap-muted italic">No requests yet</div>')

        with ui.card().classes('w-full'):
            ui.label('This installation').classes('text-lg font-medium')
            s = system.config.settings
            fact('Version', system.version)
            b = system.binary.current
            if b is None:
                fact('llama-server', 'not found')
                ui.label(system.binary.how_to_install()).classes('text-sm text-red-600')
            else:
                fact('llama-server', f'{b.version} — {b.path}')
            dirs = ', '.join(str(d) for d in s.models_dirs) or 'none configured (add one in Settings)'
            fact('Model folders', dirs)
            fact('Models found', str(len(system.library.models())))
            fact('OpenAI endpoint', f'http://{s.host}:{s.port}/v1')

        def show(sample: dict[str, Any]) -> None:
            states = {
                e.id: system.scheduler.describe(e.id).get('status') for e in system.library.models() if not e.error
            }
            k_loaded.set(f'{sum(1 for st in states.values() if st == ModelState.READY)} / {len(states)}')
            proxy = sample.get('proxy') or {}
            rps = proxy.get('requests_per_s')
            k_rps.set(f'{rps:.2f}' if isinstance(rps, (int, float)) else DASH)
            p = proxy.get('p50_latency_ms')
            k_p50.set(DASH if p is None else f'{p:.0f} ms')
            k_inflight.set(count(proxy.get('in_flight')))
            gen = generation_total(sample)
            k_gen.set(DASH if gen is None else f'{gen:.1f}')
            k_errors.set(count(proxy.get('errors_last_minute')))
            sysd = sample.get('system') or {}
            k_cpu.set(pct(sysd.get('cpu_pct')))
            k_ram.set(pct(sysd.get('ram_pct')), human_bytes(sysd.get('ram_used_bytes')))
            show_gpus(sample.get('gpu') or {})
            values = {
                'proxy.requests_per_s': proxy.get('requests_per_s'),
                'generation': gen,
                'cpu_pct': sysd.get('cpu_pct'),
                'ram_pct': sysd.get('ram_pct'),
            }
            for key, v in values.items():
                label, chart = sparks[key]
                if isinstance(v, (int, float)):
                    label.set_text(SPARKS[key][1](v))
                    chart.extend(sample['ts'], {key: v})

        gpu_cards: dict[int, KpiCard] = {}

        def show_gpus(g: dict[str, Any]) -> None:
            for info in g.get('gpus') or [] if g.get('available') else []:
                i = info['index']
                if i not in gpu_cards:
                    with gpu_row:
                        gpu_cards[i] = KpiCard(f'GPU {i} · {info.get("name") or ""}', f'kpi-gpu-{i}')
                used, total = info.get('memory_used_bytes'), info.get('memory_total_bytes')
                temp, power = info.get('temperature_c'), info.get('power_draw_w')
                gpu_cards[i].set(
                    pct(info.get('utilization_pct')),
                    f'{human_bytes(used)} / {human_bytes(total)} · '
                    f'{DASH if temp is None else f"{temp:.0f} °C"} · {DASH if power is None else f"{power:.0f} W"}',
                )

        def loaded_models() -> None:
            sample = system.metrics.latest or {}
            loaded_box.clear()
            with loaded_box:
                running = [
                    (e.id, d)
                    for e in system.library.models()
                    if (d := system.scheduler.describe(e.id)).get('status') != ModelState.STOPPED
                ]
                if not running:
                    empty('No model loaded. Load one on Models, or send a request: it starts on demand.')
                for mid, d in running:
                    m = (sample.get('models') or {}).get(mid) or {}
                    with ui.row().classes('items-center gap-2 w-full flex-wrap').mark(f'loaded-{mid}'):
                        ui.label(mid).classes('font-medium break-all')
                        ui.badge(str(d['status']), color=STATE_COLOR.get(d['status'], 'grey'))
                        figures = [f'up {uptime(d.get("uptime_s"))}', f'RSS {human_bytes(m.get("rss_bytes"))}']
                        if m.get('vram_bytes'):
                            figures.append(f'VRAM {human_bytes(m["vram_bytes"])}')
                        figures.append(f'in flight {d.get("inflight", 0)}')
                        ui.label(' · '.join(figures)).classes('text-xs lap-muted font-mono')
                        ui.space()
                        ui.button('Unload', on_click=lambda m=mid: unload(m)).props('outline dense size=sm').mark(
                            f'dash-unload-{mid}'
                        )

        def alerts() -> None:
            snap = system.metrics.alerts.snapshot()
            lines = notable_lines(system)
            alerts_box.clear()
            with alerts_box:
                for a in snap['active']:
                    ui.label(f'{clock(a["raised_at"])} {a["message"]}').classes('text-sm text-red-600').mark('alert')
                for a in snap['recent'][:3]:
                    if a.get('cleared_at'):
                        ui.label(f'{clock(a["raised_at"])} {a["message"]} (cleared)').classes('text-sm lap-muted')
                for d in reversed(lines):
                    color = 'text-red-600' if d['level'] == 'error' else 'text-amber-600'
                    ui.label(line_text(d)).classes(f'text-xs font-mono break-all {color}').mark('warning-line')
                if not snap['active'] and not snap['recent'] and not lines:
                    empty('No alerts, no warnings.')

        def requests() -> None:
            table.rows = [request_row(r) for r in system.proxy.activity.latest(RECENT)]
            table.update()

        history = await system.metrics.history_query('5m', ['proxy.requests_per_s', 'cpu_pct', 'ram_pct', 'model.*'])
        series = history['series']
        for key, (_, chart) in sparks.items():
            points = _generation_series(series) if key == 'generation' else series.get(key, [])
            chart.seed({key: points} if points else {})
        if system.metrics.latest:
            show(system.metrics.latest)
        loaded_models()
        alerts()
        requests()

        subscribe(system, ['metrics'], lambda e: show(e.data))
        live(system, ['models'], loaded_models, every_ms=100)  # ready on screen within 100 ms (bench/ui_load.py)
        live(system, ['metrics'], loaded_models, every_ms=1000)  # uptime and RSS
        live(system, ['requests'], requests, every_ms=500)
        poke_alerts = live(system, ['alerts'], alerts, every_ms=1000)

        def on_log(event: Event) -> None:
            level = LEVELS.index(event.data.get('level', 'debug'))
            if level >= LEVELS.index('error') or (level >= LEVELS.index('warning') and event.data['source'] == 'app'):
                poke_alerts()

        subscribe(system, ['logs'], on_log)
        on_reconnect(lambda: show(system.metrics.latest) if system.metrics.latest else None)
