"""Scrape a running llama-server's own `/metrics` (Prometheus text, needs `--metrics`) and `/slots`.

Token rates are computed from the counters' change between two scrapes of the same server, so they show what
the server does now; llama-server's own `*_tokens_seconds` gauges are lifetime averages and are kept as such.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# llama.cpp's metric names (prefix `llamacpp:`) -> our field names.
_FIELDS = {
    'prompt_tokens_total': 'prompt_tokens_total',
    'prompt_tokens_cached_total': 'prompt_tokens_cached_total',
    'prompt_seconds_total': 'prompt_seconds_total',
    'tokens_predicted_total': 'generation_tokens_total',
    'tokens_predicted_seconds_total': 'generation_seconds_total',
    'n_decode_total': 'decode_calls_total',
    'n_tokens_max': 'tokens_max',
    'prompt_tokens_seconds': 'prompt_tokens_per_s_avg',
    'predicted_tokens_seconds': 'generation_tokens_per_s_avg',
    'requests_processing': 'requests_processing',
    'requests_deferred': 'requests_deferred',
    'n_busy_slots_per_decode': 'busy_slots_per_decode',
}


def parse_llama_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix('llamacpp:')
            field = _FIELDS.get(name)
            if field is not None and not sample.labels:
                out[field] = float(sample.value)
    return out


def summarize_slots(slots: Any) -> dict[str, Any]:
    """Busy slots and how much of the context (KV cache) the busy slots hold."""
    if not isinstance(slots, list):
        return {}
    total = len(slots)
    busy = [s for s in slots if isinstance(s, dict) and s.get('is_processing')]
    ctx_total = sum(int(s.get('n_ctx') or 0) for s in slots if isinstance(s, dict))
    used = 0
    for s in busy:
        decoded = 0
        for nt in s.get('next_token') or []:
            decoded = max(decoded, int(nt.get('n_decoded') or 0))
        used += int(s.get('n_prompt_tokens') or 0) + decoded
    return {
        'slots_total': total,
        'slots_busy': len(busy),
        'ctx_total_tokens': ctx_total,
        'ctx_used_tokens': used,
        'kv_used_pct': (100.0 * used / ctx_total) if ctx_total else None,
    }


class LlamaScraper:
    """Scrapes every running server concurrently with short timeouts; remembers counters to derive rates."""

    def __init__(self, timeout: float = 1.0) -> None:
        self._client: httpx.AsyncClient | None = None
        self._timeout = timeout
        self._prev: dict[str, tuple[float, dict[str, float]]] = {}
        self._idle_slots: dict[str, dict[str, Any]] = {}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def scrape_all(
        self, servers: dict[str, str], keys: dict[str, str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """`servers` maps model id -> base_url; `keys` model id -> the server's API key."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        keys = keys or {}
        results = await asyncio.gather(*(self.scrape(m, url, keys.get(m)) for m, url in servers.items()))
        self._prev = {m: p for m, p in self._prev.items() if m in servers}
        self._idle_slots = {u: v for u, v in self._idle_slots.items() if u in servers.values()}
        return dict(zip(servers, results, strict=True))

    async def scrape(self, model: str, base_url: str, api_key: str | None = None) -> dict[str, Any]:
        assert self._client is not None
        out: dict[str, Any] = {}
        errors: list[str] = []
        headers = {'Authorization': f'Bearer {api_key}'} if api_key else None
        metrics_r = await _get(self._client, f'{base_url}/metrics', headers)
        now = time.monotonic()
        values: dict[str, float] = {}
        if isinstance(metrics_r, httpx.Response) and metrics_r.status_code == 200:
            try:
                values = parse_llama_metrics(metrics_r.text)
            except ValueError as e:
                errors.append(f'metrics: {e}')
            out.update(values)
            out.update(self._rates(model, now, values))
        else:
            errors.append(f'metrics: {_why(metrics_r)}')
        idle_slots = self._idle_slots.get(base_url)
        if values.get('requests_processing') == 0 and idle_slots is not None:
            # Nothing is processing, so no slot is busy: the slot layout cannot change while the server lives,
            # and skipping the request halves the sampler's cost per idle model.
            out.update(idle_slots)
        else:
            slots_r = await _get(self._client, f'{base_url}/slots', headers)
            if isinstance(slots_r, httpx.Response) and slots_r.status_code == 200:
                try:
                    slots = summarize_slots(slots_r.json())
                except ValueError as e:
                    errors.append(f'slots: {e}')
                else:
                    out.update(slots)
                    if slots:
                        self._idle_slots[base_url] = {
                            **slots,
                            'slots_busy': 0,
                            'ctx_used_tokens': 0,
                            'kv_used_pct': 0.0,
                        }
            else:
                errors.append(f'slots: {_why(slots_r)}')
        if errors:
            out['errors'] = errors
        return out

    def _rates(self, model: str, now: float, values: dict[str, float]) -> dict[str, float | None]:
        prev = self._prev.get(model)
        self._prev[model] = (now, values)
        rates: dict[str, float | None] = {'prompt_tokens_per_s': None, 'generation_tokens_per_s': None}
        if prev is None or now <= prev[0]:
            return rates
        dt = now - prev[0]
        for total, rate in (
            ('prompt_tokens_total', 'prompt_tokens_per_s'),
            ('generation_tokens_total', 'generation_tokens_per_s'),
        ):
            if total in values and total in prev[1]:
                rates[rate] = max(0.0, (values[total] - prev[1][total]) / dt)  # a restart resets the counter
        return rates


async def _get(client: httpx.AsyncClient, url: str, headers: dict[str, str] | None) -> httpx.Response | Exception:
    try:
        return await client.get(url, headers=headers)
    except Exception as e:  # reported as this scrape's error, whatever it is
        # Not only httpx's errors: a server torn down mid-connect (a swap) raised AttributeError from deep in the
        # transport (`getpeername` of a closed socket) in the soak, which lost that whole sample.
        return e


def _why(r: Any) -> str:
    if isinstance(r, httpx.Response):
        return f'HTTP {r.status_code}'
    return f'{type(r).__name__}: {r}' if str(r) else type(r).__name__
