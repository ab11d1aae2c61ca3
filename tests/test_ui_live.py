"""Dashboard and Monitoring pages show measured values that move with the shared sampler and the proxy."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from nicegui import app
from nicegui.testing import User

from tests.conftest import wait_for


@pytest.fixture
def fast_sampler(monkeypatch: pytest.MonkeyPatch, models_env: Path) -> Path:
    monkeypatch.setenv('LAP_METRICS_INTERVAL', '0.2')
    return models_env


async def test_dashboard_kpis_and_recent_requests(fast_sampler: Path, user: User) -> None:
    await user.open('/')
    system = app.state.system
    await wait_for(lambda: system.library.get('tiny-llama') and system.metrics.latest, deadline_s=20)
    await user.should_see(marker='kpi-cpu')
    await user.should_see(' %', retries=20)  # CPU and RAM filled in from a real sample
    up = await system.scheduler.load('tiny-llama')
    # A request through the proxy's own ASGI path shows up in the recent-requests table.
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url='http://127.0.0.1') as client:
        r = await client.post(
            '/v1/chat/completions',
            json={'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 8},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    assert up.port
    await wait_for(lambda: system.proxy.activity.recent(limit=1), deadline_s=10)
    table = user.find(marker='recent-requests').elements.pop()
    await wait_for(lambda: any(r['route'] == '/v1/chat/completions' and r['status'] == 200 for r in table.rows))
    loaded = user.find(marker='kpi-loaded').elements.pop()
    await wait_for(lambda: loaded.text.startswith('1 / '))  # one model loaded, as the sampler saw it
    await user.should_see(marker='loaded-tiny-llama', retries=50)  # in the loaded-models panel, with Unload
    rps = user.find(marker='spark-proxy.requests_per_s').elements.pop()
    await wait_for(lambda: rps.text not in ('—', '0.00'), deadline_s=10)
    # A failed request is marked as one.
    async with httpx.AsyncClient(transport=transport, base_url='http://127.0.0.1') as client:
        r = await client.post('/v1/chat/completions', json={'model': 'nope', 'messages': []}, timeout=30)
    assert r.status_code == 404
    await wait_for(lambda: any(row['failed'] and row['status'] == 404 for row in table.rows))
    user.find(marker='dash-unload-tiny-llama').click()
    await user.should_see('tiny-llama stopped', retries=50)
    await wait_for(lambda: system.scheduler.describe('tiny-llama')['status'] == 'stopped', deadline_s=20)


async def test_dashboard_shows_warnings_and_errors_from_the_log(user: User) -> None:
    await user.open('/')
    app.state.system.logs.add('llama-server', 'the GPU is on fire', 'error', model='m1')
    await user.should_see('the GPU is on fire', retries=30)


async def test_monitoring_page_draws_from_history_and_extends(fast_sampler: Path, user: User) -> None:
    await user.open('/monitoring')
    system = app.state.system
    await wait_for(lambda: system.metrics.samples_taken >= 2, deadline_s=20)
    await user.open('/monitoring')
    await user.should_see('no NVIDIA GPU detected', retries=20)
    assert len(user.find(ui_plotly()).elements) == 6  # no GPU charts without a GPU (not hidden ones)
    cpu = user.find(marker='chart-system').elements.pop()
    names = [t['name'] for t in cpu.figure['data']]
    assert names[:2] == ['CPU %', 'RAM %']
    seeded = len(cpu.figure['data'][0]['x'])
    assert seeded >= 1  # seeded from the sampler's history
    await wait_for(lambda: len(cpu.figure['data'][0]['x']) > seeded, deadline_s=10)  # and grows live
    latency = user.find(marker='chart-latency').elements.pop()
    assert latency.figure['layout']['annotations'][0]['text'] == 'no data yet'  # no request yet: says so
    user.find(marker='window').elements.pop().set_value('1h')
    await wait_for(lambda: len(cpu.figure['data'][0]['x']) >= 1)  # drawn again from the 1 h history


def ui_plotly() -> type:
    from nicegui import ui

    return ui.plotly


FAKE_GPU = {  # NVML's answer as core/gpu.status() shapes it; no machine here has a GPU to read
    'available': True,
    'message': None,
    'reason': None,
    'driver_version': '550.54',
    'gpus': [
        {
            'index': 0,
            'name': 'NVIDIA Test 24GB',
            'utilization_pct': 37.0,
            'memory_used_bytes': 6 * 2**30,
            'memory_total_bytes': 24 * 2**30,
            'memory_used_pct': 25.0,
            'temperature_c': 61.0,
            'power_draw_w': 142.0,
            'processes': [],
            'pids': [],
        }
    ],
}


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, fast_sampler: Path) -> None:
    import copy

    from core import gpu

    monkeypatch.setattr(gpu, 'status', lambda: copy.deepcopy(FAKE_GPU))


async def test_a_gpu_gets_a_dashboard_card_and_monitoring_charts(fake_gpu: None, user: User) -> None:
    await user.open('/')
    system = app.state.system
    await wait_for(lambda: system.metrics.samples_taken >= 1, deadline_s=20)
    card = await wait_for(lambda: user.find(marker='kpi-gpu-0').elements)
    assert card.pop().text == '37 %'
    await user.should_see('6.0 GiB / 24.0 GiB · 61 °C · 142 W')
    await user.should_see('GPU 0 · NVIDIA Test 24GB')
    await user.open('/monitoring')
    await user.should_see('GPUs: NVIDIA Test 24GB')
    titles = [p.figure['layout'].get('title', {}).get('text') for p in user.find(ui_plotly()).elements]
    assert {'GPU utilization', 'GPU memory used', 'GPU temperature', 'GPU power'} <= set(titles)


async def test_the_header_says_when_the_data_dir_is_not_written(fast_sampler: Path, user: User) -> None:
    await user.open('/')
    system = app.state.system
    await user.should_not_see(marker='data-problems')
    system.proxy.activity.write_error = 'request history not written: [Errno 28] No space left on device'
    await user.should_see('data dir not writable', retries=50)  # on the next sample's header redraw
    system.proxy.activity.write_error = None
    await user.should_not_see(marker='data-problems', retries=50)
