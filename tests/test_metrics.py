"""The metrics sampler against the real machine and a real llama-server; /api/monitoring, /metrics, alerts."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import gpu
from tests.conftest import wait_for
from tests.metrics_helpers import serve, stand_in_running


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_system_figures_match_psutil(system_factory, models_dir: Path, tiny_model: Path) -> None:
    system = await system_factory(models_dirs=[models_dir], metrics_interval=60)
    sample = await system.metrics.sample_once()
    s = sample['system']
    vm = psutil.virtual_memory()
    assert s['ram_total_bytes'] == vm.total
    assert abs(s['ram_available_bytes'] - vm.available) < 0.05 * vm.total
    assert s['cpu_count'] == psutil.cpu_count() == len(s['cpu_per_core_pct'])
    assert 0 <= s['cpu_pct'] <= 100 and all(0 <= c <= 100 for c in s['cpu_per_core_pct'])
    assert s['load_avg'] == pytest.approx(list(os.getloadavg()), abs=1.0)
    assert s['swap_total_bytes'] == psutil.swap_memory().total
    (disk,) = s['disks']
    du = psutil.disk_usage(str(models_dir))
    assert disk['path'] == str(models_dir) and disk['total_bytes'] == du.total
    assert abs(disk['free_bytes'] - du.free) < 200 * 1024 * 1024
    # The network rate needs two readings: the second sample has one, and it is a plausible number.
    second = await system.metrics.sample_once()
    net = second['system']['net']
    assert net['recv_bytes_per_s'] is not None and net['recv_bytes_per_s'] >= 0
    assert net['bytes_recv'] >= sample['system']['net']['bytes_recv']
    assert second['models'] == {} and second['proxy']['requests_total'] == 0


async def test_missing_models_dir_is_reported_not_fatal(system_factory, tmp_path: Path) -> None:
    system = await system_factory(models_dirs=[tmp_path / 'gone'], metrics_interval=60)
    sample = await system.metrics.sample_once()
    (disk,) = sample['system']['disks']
    assert disk['path'] == str(tmp_path / 'gone') and 'error' in disk


async def test_sampler_runs_on_its_own_and_publishes(system_factory) -> None:
    system = await system_factory(metrics_interval=0.1)
    seen = []
    sub = system.bus.subscribe(['metrics'], seen.append)
    try:
        await wait_for(lambda: len(seen) >= 3, deadline_s=10)
    finally:
        sub.close()
    assert all(e.type == 'sample' for e in seen)
    assert seen[1].data['ts'] > seen[0].data['ts']
    assert system.metrics.latest is not None


async def test_running_model_rss_and_token_counters(system_factory, llama_server) -> None:
    system = await system_factory(metrics_interval=60)
    stand_in_running(system, {'tiny-llama': llama_server})
    before = await system.metrics.sample_once()
    m = before['models']['tiny-llama']
    rss = psutil.Process(llama_server.proc.pid).memory_info().rss
    assert m['pid'] == llama_server.proc.pid and m['port'] == llama_server.port
    assert abs(m['rss_bytes'] - rss) < 0.2 * rss
    assert m['threads'] >= 1 and m['uptime_s'] >= 0
    llama = m['llama']
    assert 'errors' not in llama, llama
    assert llama['slots_total'] >= 1 and llama['slots_busy'] == 0
    gen0, prompt0 = llama['generation_tokens_total'], llama['prompt_tokens_total']

    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f'{llama_server.base_url}/v1/completions', json={'prompt': 'hello', 'max_tokens': 8})
    assert r.status_code == 200
    usage = r.json()['usage']

    after = await system.metrics.sample_once()
    la = after['models']['tiny-llama']['llama']
    assert la['generation_tokens_total'] - gen0 == usage['completion_tokens']
    assert la['prompt_tokens_total'] - prompt0 == usage['prompt_tokens']
    assert la['generation_tokens_per_s'] > 0
    assert after['models']['tiny-llama']['cpu_pct'] is not None

    # The same figures, with the model label, in the Prometheus text.
    async with serve(system) as served, httpx.AsyncClient() as client:
        r = await client.get(f'{served.base_url}/metrics')
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/plain')
    fam = _families(r.text)
    gen = [s for s in fam['lap_model_generation_tokens'] if s.name.endswith('_total')]
    assert [(s.labels, s.value) for s in gen] == [({'model': 'tiny-llama'}, la['generation_tokens_total'])]
    (rss_sample,) = fam['lap_model_rss_bytes']
    assert rss_sample.labels == {'model': 'tiny-llama'} and rss_sample.value > 0
    assert fam['lap_memory_total_bytes'][0].value == psutil.virtual_memory().total


async def test_dead_server_degrades_that_model_only(system_factory, llama_server) -> None:
    system = await system_factory(metrics_interval=60)
    stand_in_running(system, {'tiny-llama': llama_server})
    llama_server.proc.kill()
    llama_server.proc.wait()
    sample = await system.metrics.sample_once()
    m = sample['models']['tiny-llama']
    assert m['error'] == 'NoSuchProcess'
    assert any(e.startswith('metrics:') for e in m['llama']['errors'])
    assert sample['system']['ram_total_bytes'] > 0


async def test_no_nvml_says_so_and_nothing_errors(system_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    gpu.shutdown()
    monkeypatch.setattr(pynvml, 'nvmlInit', no_library)
    try:
        assert gpu.available() is False
        assert gpu.gpus() == [] and gpu.free_vram_bytes() is None
        system = await system_factory(metrics_interval=60)
        sample = await system.metrics.sample_once()
        assert sample['gpu']['available'] is False
        assert sample['gpu']['message'] == 'no NVIDIA GPU detected'
        async with serve(system) as served, httpx.AsyncClient() as client:
            r = await client.get(f'{served.base_url}/api/monitoring/gpu')
            text = (await client.get(f'{served.base_url}/metrics')).text
        assert r.json()['message'] == 'no NVIDIA GPU detected'
        assert _families(text)['lap_gpu_available'][0].value == 0
    finally:
        gpu.shutdown()


def test_one_failing_nvml_call_degrades_one_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML stand-in: temperature is unsupported, everything else reads (a fault only a fake can inject here)."""
    from types import SimpleNamespace

    import pynvml

    fake = SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f'h{i}',
        nvmlDeviceGetName=lambda h: b'Fake H100',
        nvmlDeviceGetUUID=lambda h: 'GPU-1',
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=37, memory=12),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2 << 30, total=80 << 30, free=78 << 30),
        nvmlDeviceGetTemperature=lambda h, kind: (_ for _ in ()).throw(pynvml.NVMLError(3)),
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetPowerUsage=lambda h: 123_456,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetFanSpeed=lambda h: (_ for _ in ()).throw(pynvml.NVMLError(3)),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=4242, usedGpuMemory=1 << 30)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [],
    )
    monkeypatch.setattr(gpu._nvml, 'mod', fake)
    monkeypatch.setattr(gpu._nvml, '_tried', True)
    monkeypatch.setattr(gpu._nvml, '_ok', True)
    (g,) = gpu.gpus()
    assert g.name == 'Fake H100' and g.utilization_pct == 37 and g.memory_total_bytes == 80 << 30
    assert g.temperature_c is None and g.fan_pct is None
    assert g.power_draw_w == pytest.approx(123.456) and g.power_limit_w == 700
    assert g.pids == [4242] and g.memory_used_pct == pytest.approx(2.5)
    assert {e.split(':')[0] for e in g.errors} == {'temperature', 'fan'}
    assert gpu.free_vram_bytes() == 78 << 30


async def test_monitoring_endpoints(system_factory, models_dir: Path) -> None:
    system = await system_factory(models_dirs=[models_dir], metrics_interval=0.2)
    await wait_for(lambda: system.metrics.samples_taken >= 3)
    async with serve(system) as served, httpx.AsyncClient(base_url=served.base_url) as client:
        latest = (await client.get('/api/monitoring')).json()
        assert latest['system']['ram_total_bytes'] == psutil.virtual_memory().total
        hist = (await client.get('/api/monitoring/history', params={'window': '5m', 'series': 'cpu_pct,disk.*'})).json()
        assert set(hist['series']) == {'cpu_pct', f'disk.{models_dir}.free_bytes'}
        assert len(hist['series']['cpu_pct']) >= 3 and 'ram_pct' in hist['available']
        assert hist['resolution_s'] == pytest.approx(0.2, abs=0.1)
        assert (await client.get('/api/monitoring/history', params={'window': '3y'})).status_code == 422
        alerts = (await client.get('/api/alerts')).json()
        assert alerts['active'] == [] and alerts['rules']['ram_pct'] == 90


async def test_proxy_request_events_feed_figures_and_histograms(system_factory, models_dir, tiny_model) -> None:
    system = await system_factory(metrics_interval=60, models_dirs=[models_dir])  # labels name known models only
    for status, duration in ((200, 0.2), (200, 0.4), (502, 1.5)):
        system.bus.publish(
            'requests',
            'finished',
            {
                'model': 'tiny-llama',
                'route': '/v1/chat/completions',
                'status': status,
                'duration': duration,
                'ttft': 0.05,
                'tokens': 8,
            },
        )
    sample = await system.metrics.sample_once()
    proxy = sample['proxy']
    assert proxy['requests_last_minute'] == 3 and proxy['errors_last_minute'] == 1
    assert proxy['p50_latency_ms'] == pytest.approx(400)
    fam = _families(system.metrics.prometheus_text().decode())
    counts = {s.labels['status']: s.value for s in fam['lap_proxy_requests'] if s.name.endswith('_total')}
    assert counts == {'200': 2, '502': 1}
    buckets = [s for s in fam['lap_proxy_request_duration_seconds'] if s.name.endswith('_bucket')]
    le_half = [s for s in buckets if s.labels['status'] == '200' and s.labels['le'] == '0.5']
    assert le_half[0].value == 2 and le_half[0].labels['model'] == 'tiny-llama'


async def test_ram_alert_raised_logged_and_listed(system_factory) -> None:
    ram = psutil.virtual_memory().percent
    system = await system_factory(metrics_interval=60, alert_ram_pct=max(0.1, ram / 4))
    got = []
    sub = system.bus.subscribe(['alerts'], got.append)
    await system.metrics.sample_once()
    await system.metrics.sample_once()  # no second alert for the same condition
    sub.close()
    assert [e.type for e in got] == ['raised'] and got[0].data['kind'] == 'ram'
    assert any('alert: RAM use' in r.message for r in system.logs.query(level='warning'))
    async with serve(system) as served, httpx.AsyncClient() as client:
        listed = (await client.get(f'{served.base_url}/api/alerts')).json()
    assert [a['key'] for a in listed['active']] == ['ram']


async def test_busy_slot_and_kv_use_while_generating(system_factory, llama_server) -> None:
    system = await system_factory(metrics_interval=60)
    stand_in_running(system, {'tiny-llama': llama_server})
    idle = (await system.metrics.sample_once())['models']['tiny-llama']['llama']
    assert idle['slots_busy'] == 0 and idle['requests_processing'] == 0
    body = {'prompt': 'hello there', 'max_tokens': 500, 'stream': True}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream('POST', f'{llama_server.base_url}/v1/completions', json=body) as resp:
            chunks = resp.aiter_lines()
            while not (await anext(chunks)).startswith('data: '):  # generation has begun
                pass
            busy = (await system.metrics.sample_once())['models']['tiny-llama']['llama']
    assert busy['requests_processing'] == 1 and busy['slots_busy'] == 1
    assert busy['ctx_used_tokens'] > 0 and 0 < busy['kv_used_pct'] < 100


def test_request_figures_cover_the_last_minute_only() -> None:
    from core.metrics.requests import FinishedRequest, RequestStats

    t0 = 1_000_000.0
    stats = RequestStats(latencies_kept=100, started=t0)

    def req(ts: float, duration: float, error: bool = False) -> FinishedRequest:
        return FinishedRequest(ts, 'm', '/v1/embeddings', '500' if error else '200', duration, None, error)

    for i in range(500):  # 500 quick requests 70 s ago, one of them failed
        stats.add(req(t0 + i / 1000, 0.001, error=i == 0))
    for i in range(300):  # 300 slower ones over the last 30 s
        stats.add(req(t0 + 40 + i / 10, 0.25))
    s = stats.summary(in_flight=2, now=t0 + 70.5)
    assert s['requests_last_minute'] == 300 and s['errors_last_minute'] == 0
    assert s['requests_per_s'] == pytest.approx(5.0)
    assert s['p50_latency_ms'] == pytest.approx(250)
    assert s['requests_total'] == 800 and s['errors_total'] == 1 and s['in_flight'] == 2
    assert stats.summary(None, now=t0 + 200)['requests_last_minute'] == 0


async def test_made_up_model_names_get_no_metrics_series_but_stay_in_the_history(make_served) -> None:
    """A failed request's row names the model it asked for; /metrics labels it `(unknown)`, so a client sending
    random names cannot grow the exposition (and the server's memory) without bound."""
    async with await make_served() as served, served.client() as client:
        for i in range(5):
            body = {'model': f'=made-up-{i}', 'messages': [{'role': 'user', 'content': 'hi'}]}
            assert (await client.post('/v1/chat/completions', json=body)).status_code == 404
        served.system.proxy.activity.flush()
        text = (await client.get('/metrics')).text
        rows = (await client.get('/api/requests', params={'status': 'error'})).json()['requests']
        csv_text = (await client.get('/api/requests/export', params={'format': 'csv'})).text
    assert 'made-up' not in text and 'model="(unknown)"' in text
    assert sorted(r['model'] for r in rows) == [f'=made-up-{i}' for i in range(5)]
    assert "'=made-up-0" in csv_text and '\n=made-up' not in csv_text and ',=made-up' not in csv_text  # no formula
