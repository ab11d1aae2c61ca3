"""Dashboard: live KPIs from the shared sampler, loaded models, recent requests; every number measured."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nicegui import ui

from ui.format import human_bytes
from ui.layout import fact, page, subscribe

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

REQUEST_COLUMNS = [
    {'name': 'time', 'label': 'Time', 'field': 'time', 'align': 'left'},
    {'name': 'model', 'label': 'Model', 'field': 'model', 'align': 'left'},
    {'name': 'route', 'label': 'Route', 'field': 'route', 'align': 'left'},
    {'name': 'status', 'label': 'Status', 'field': 'status'},
    {'name': 'ttft', 'label': 'TTFT ms', 'field': 'ttft'},
    {'name': 'duration', 'label': 'Duration ms', 'field': 'duration'},
    {'name': 'tokens', 'label': 'Prompt / gen tokens', 'field': 'tokens'},
    {'name': 'tps', 'label': 'Gen tok/s', 'field': 'tps'},
]


def _ms(seconds: Any) -> str:
    return '—' if seconds is None else f'{seconds * 1000:.0f}'


def request_row(r: dict[str, Any]) -> dict[str, Any]:
    tps = r.get('gen_tps')
    return {
        'id': r.get('id'),
        'time': time.strftime('%H:%M:%S', time.localtime(r.get('ts') or 0)),
        'model': r.get('model') or '—',
        'route': r.get('route') or '',
        'status': r.get('status') if r.get('status') is not None else 'in flight',
        'ttft': _ms(r.get('ttft_s')),
        'duration': _ms(r.get('duration_s')),
        'tokens': f'{r.get("prompt_tokens") or 0} / {r.get("completion_tokens") or 0}',
        'tps': '—' if tps is None else f'{tps:.1f}',
    }


def kpi(label: str, marker: str) -> ui.label:
    with ui.card().classes('min-w-[150px]'):
        ui.label(label).classes('text-xs text-gray-500')
        return ui.label('—').classes('text-2xl font-semibold').mark(marker)


def register(system: System) -> None:
    @page(system, '/', 'Dashboard')
    def dashboard() -> None:
        with ui.row().classes('gap-4 flex-wrap'):
            loaded = kpi('Models loaded', 'kpi-loaded')
            rps = kpi('Requests/s (1 min)', 'kpi-rps')
            p50 = kpi('p50 latency (1 min)', 'kpi-p50')
            inflight = kpi('In flight', 'kpi-inflight')
            gen = kpi('Generation tok/s', 'kpi-gen')
            cpu = kpi('CPU', 'kpi-cpu')
            ram = kpi('RAM', 'kpi-ram')
            gpu = kpi('GPU', 'kpi-gpu')

        def show(sample: dict[str, Any]) -> None:
            models = sample.get('models') or {}
            loaded.set_text(f'{len(models)} / {len(system.library.models())}')
            proxy = sample.get('proxy') or {}
            rps.set_text(f'{proxy.get("requests_per_s", 0):.2f}')
            p = proxy.get('p50_latency_ms')
            p50.set_text('—' if p is None else f'{p:.0f} ms')
            inflight.set_text(str(proxy.get('in_flight', 0)))
            tps = [(m.get('llama') or {}).get('generation_tokens_per_s') for m in models.values()]
            measured = [t for t in tps if isinstance(t, (int, float))]
            gen.set_text(f'{sum(measured):.1f}' if measured else '—')
            s = sample.get('system') or {}
            cpu.set_text(f'{s.get("cpu_pct", 0):.0f} %')
            ram.set_text(f'{human_bytes(s.get("ram_used_bytes"))} ({s.get("ram_pct", 0):.0f} %)')
            g = sample.get('gpu') or {}
            if g.get('available') and g.get('gpus'):
                g0 = g['gpus'][0]
                gpu.set_text(f'{g0.get("utilization_pct", "—")} % · {g0.get("memory_used_pct", "—")} % mem')
            else:
                gpu.set_text('none')

        if system.metrics.latest:
            show(system.metrics.latest)

        ui.label('Recent requests').classes('text-lg font-medium mt-4')
        table = ui.table(columns=REQUEST_COLUMNS, rows=[], row_key='id').classes('w-full').mark('recent-requests')

        def load_requests() -> None:
            table.rows = [request_row(r) for r in system.proxy.activity.recent(limit=15)]
            table.update()

        load_requests()
        dirty = {'requests': False}

        def on_request(event: Event) -> None:
            dirty['requests'] = True

        def flush() -> None:
            if dirty['requests']:
                dirty['requests'] = False
                load_requests()

        subscribe(system, ['metrics'], lambda e: show(e.data))
        subscribe(system, ['requests'], on_request)
        ui.timer(0.5, flush)

        with ui.card().classes('w-full mt-4'):
            ui.label('This installation').classes('text-lg font-medium')
            s = system.config.settings
            fact('Version', system.version)
            b = system.binary.current
            if b is None:
                fact('llama-server', 'not found')
                ui.label(system.binary.how_to_install()).classes('text-sm text-red-700')
            else:
                fact('llama-server', f'{b.version} — {b.path}')
            dirs = ', '.join(str(d) for d in s.models_dirs) or 'none configured (add one in Settings)'
            fact('Model folders', dirs)
            fact('Models found', str(len(system.library.models())))
            fact('OpenAI endpoint', f'http://{s.host}:{s.port}/v1')
