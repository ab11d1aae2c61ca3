"""Prometheus exposition: a collector over the latest sample plus request counters and latency histograms.

Everything lives in this service's own `CollectorRegistry` (tests build several Systems in one process; the
global registry would collide). The text is produced by `prometheus_client.generate_latest`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.metrics.requests import FinishedRequest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float('inf'))


class _SampleCollector(Collector):
    def __init__(self, latest: Callable[[], dict[str, Any] | None], alerts: Callable[[], int]) -> None:
        self._latest = latest
        self._alerts = alerts

    def collect(self) -> Iterator[Metric]:
        s = self._latest()
        yield _gauge('lap_alerts_active', 'Alerts currently raised', self._alerts())
        if not s:
            return
        sysd = s.get('system') or {}
        yield _gauge('lap_cpu_percent', 'System CPU use, all cores', sysd.get('cpu_pct'))
        cores = GaugeMetricFamily('lap_cpu_core_percent', 'CPU use per core', labels=['core'])
        for i, v in enumerate(sysd.get('cpu_per_core_pct') or []):
            cores.add_metric([str(i)], v)
        yield cores
        load = GaugeMetricFamily('lap_load_average', 'Load average', labels=['period'])
        for period, v in zip(('1m', '5m', '15m'), sysd.get('load_avg') or [], strict=False):
            load.add_metric([period], v)
        yield load
        for key, name, doc in (
            ('ram_total_bytes', 'lap_memory_total_bytes', 'Physical memory'),
            ('ram_used_bytes', 'lap_memory_used_bytes', 'Physical memory in use (total - available)'),
            ('ram_available_bytes', 'lap_memory_available_bytes', 'Physical memory available'),
            ('swap_total_bytes', 'lap_swap_total_bytes', 'Swap size'),
            ('swap_used_bytes', 'lap_swap_used_bytes', 'Swap in use'),
        ):
            yield _gauge(name, doc, sysd.get(key))
        free = GaugeMetricFamily('lap_disk_free_bytes', 'Free space of a models dir', labels=['path'])
        total = GaugeMetricFamily('lap_disk_total_bytes', 'Size of a models dir filesystem', labels=['path'])
        for d in sysd.get('disks') or []:
            if 'free_bytes' in d:
                free.add_metric([d['path']], d['free_bytes'])
                total.add_metric([d['path']], d['total_bytes'])
        yield free
        yield total
        net = sysd.get('net') or {}
        if net.get('bytes_sent') is not None:
            yield CounterMetricFamily('lap_network_sent_bytes', 'Bytes sent, all interfaces', net['bytes_sent'])
            yield CounterMetricFamily('lap_network_received_bytes', 'Bytes received', net['bytes_recv'])

        gpu = s.get('gpu') or {}
        yield _gauge('lap_gpu_available', 'Whether NVML sees an NVIDIA GPU', 1 if gpu.get('available') else 0)
        gpu_fields = (
            ('utilization_pct', 'lap_gpu_utilization_percent', 'GPU utilization'),
            ('memory_used_bytes', 'lap_gpu_memory_used_bytes', 'GPU memory in use'),
            ('memory_total_bytes', 'lap_gpu_memory_total_bytes', 'GPU memory size'),
            ('temperature_c', 'lap_gpu_temperature_celsius', 'GPU temperature'),
            ('power_draw_w', 'lap_gpu_power_watts', 'GPU power draw'),
            ('power_limit_w', 'lap_gpu_power_limit_watts', 'GPU enforced power limit'),
            ('fan_pct', 'lap_gpu_fan_percent', 'GPU fan speed'),
        )
        families = {key: GaugeMetricFamily(name, doc, labels=['gpu', 'name']) for key, name, doc in gpu_fields}
        for g in gpu.get('gpus') or []:
            for key, fam in families.items():
                if g.get(key) is not None:
                    fam.add_metric([str(g['index']), g.get('name') or ''], g[key])
        yield from families.values()

        model_gauges = (
            ('rss_bytes', 'lap_model_rss_bytes', 'Resident memory of the model’s llama-server'),
            ('cpu_pct', 'lap_model_cpu_percent', 'CPU use of the llama-server (100 = one core)'),
            ('threads', 'lap_model_threads', 'Threads of the llama-server'),
            ('uptime_s', 'lap_model_uptime_seconds', 'Seconds since the llama-server started'),
        )
        llama_gauges = (
            ('prompt_tokens_per_s', 'lap_model_prompt_tokens_per_second', 'Prompt tokens/s over the last sample'),
            ('generation_tokens_per_s', 'lap_model_generation_tokens_per_second', 'Generated tokens/s, last sample'),
            ('requests_processing', 'lap_model_requests_processing', 'Requests the llama-server is processing'),
            ('requests_deferred', 'lap_model_requests_deferred', 'Requests the llama-server deferred'),
            ('slots_busy', 'lap_model_slots_busy', 'Busy slots'),
            ('slots_total', 'lap_model_slots_total', 'Slots'),
            ('kv_used_pct', 'lap_model_kv_cache_used_percent', 'Context (KV cache) held by busy slots'),
        )
        llama_counters = (
            ('prompt_tokens_total', 'lap_model_prompt_tokens', 'Prompt tokens processed by the llama-server'),
            ('generation_tokens_total', 'lap_model_generation_tokens', 'Tokens generated by the llama-server'),
        )
        g_fams = {k: GaugeMetricFamily(n, d, labels=['model']) for k, n, d in model_gauges + llama_gauges}
        c_fams = {k: CounterMetricFamily(n, d, labels=['model']) for k, n, d in llama_counters}
        up = GaugeMetricFamily('lap_model_up', 'A llama-server is running for the model', labels=['model'])
        for model, m in (s.get('models') or {}).items():
            up.add_metric([model], 1)
            llama = m.get('llama') or {}
            for key, _, _ in model_gauges:
                if m.get(key) is not None:
                    g_fams[key].add_metric([model], m[key])
            for key, _, _ in llama_gauges:
                if llama.get(key) is not None:
                    g_fams[key].add_metric([model], llama[key])
            for key, c_fam in c_fams.items():
                if llama.get(key) is not None:
                    c_fam.add_metric([model], llama[key])
        yield up
        yield from g_fams.values()
        yield from c_fams.values()

        proxy = s.get('proxy') or {}
        yield _gauge('lap_proxy_requests_in_flight', 'Requests the proxy is relaying', proxy.get('in_flight'))
        yield _gauge(
            'lap_proxy_requests_per_second', 'Finished requests/s over the last minute', proxy.get('requests_per_s')
        )


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc)
    if isinstance(value, (int, float)):
        fam.add_metric([], value)
    return fam


class Exposition:
    def __init__(self, latest: Callable[[], dict[str, Any] | None], active_alerts: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SampleCollector(latest, active_alerts))
        labels = ['model', 'route', 'status', 'upstream']  # upstream: a remote's name, or `local`
        self.requests = Counter('lap_proxy_requests', 'Finished proxy requests', labels, registry=self.registry)
        self.latency = Histogram(
            'lap_proxy_request_duration_seconds',
            'Proxy request duration',
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}
        self.ttft = Histogram(
            'lap_proxy_time_to_first_token_seconds',
            'Time to the first streamed token',
            ['model', 'route'],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, r: FinishedRequest) -> None:
        # Label lookups cost more than the updates; this runs once per proxied request, so keep the children.
        key = (r.model, r.route, r.status, r.upstream)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.latency.labels(*key),
                self.ttft.labels(r.model, r.route),
            )
        children[0].inc()
        if r.duration_s is not None:
            children[1].observe(r.duration_s)
        if r.ttft_s is not None:
            children[2].observe(r.ttft_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
