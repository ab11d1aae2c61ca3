"""Restart on a config change: a saved change of a running model's launch -> its new server serving a first token,
against llama-server's own spawn -> first token. Writes `## Restart on a config change` in docs/BENCHMARKS.md.

    .venv/bin/python bench/restart_on_change.py [--runs 10]

One System (no web server) with the tiny generated model running. Each run saves a new `ctx_size` for it (1024 and
2048 in turn) through `SettingsManager.update` + `System.apply_config`, as `PUT /api/models/{id}/parameters` does,
and times until a streamed request to the model gets its first token from the new server (it waits while the old
one drains and the new one starts). Interleaved with llama-server started alone with the same argv
(`bench/cold_start.py`'s direct path), so the difference is what the swap adds.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cold_start import direct, first_token, tiny_system
from bench.report import write_section
from core.system import System

SECTION = '## Restart on a config change'


async def restart(system: System, model_id: str, ctx: int, client: httpx.AsyncClient) -> float:
    """Save -> first token from the new server, in ms."""
    old = system.scheduler.describe(model_id)['pid']
    t0 = time.perf_counter()
    await asyncio.to_thread(system.config.update, {'models': {model_id: {'ctx_size': ctx}}})
    applied = await system.apply_config()
    assert applied['restarting'] == [model_id], applied
    async with system.scheduler.lease(model_id) as up:
        await first_token(client, up.base_url, up.api_key)
    elapsed = (time.perf_counter() - t0) * 1000
    assert system.scheduler.describe(model_id)['pid'] != old
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        system, model, model_id = await tiny_system(Path(tmp_s))
        try:
            alone, swaps = [], []
            async with httpx.AsyncClient(timeout=30) as client:
                await system.scheduler.load(model_id)
                await direct(system, model, client)  # warm the page cache and the binary
                for i in range(args.runs):
                    alone.append((await direct(system, model, client))[1])
                    swaps.append(await restart(system, model_id, 1024 if i % 2 == 0 else 2048, client))
        finally:
            await system.stop()
    med = statistics.median
    q = statistics.quantiles
    added = [s - a for s, a in zip(swaps, alone, strict=True)]
    text = f"""{SECTION}

Command: `.venv/bin/python bench/restart_on_change.py --runs {args.runs}` ({platform.machine()}, Python \
{platform.python_version()}; shared, noisy 2-core machine). Tiny generated model, real llama-server, runs interleaved.

| path | median ms | p90 ms |
|---|---|---|
| llama-server alone: spawn -> first token | {med(alone):.1f} | {q(alone, n=10)[-1]:.1f} |
| saved change of the running model's ctx_size -> first token from its new server | {med(swaps):.1f} | \
{q(swaps, n=10)[-1]:.1f} |
| **added by the swap** (per pair) | **{med(added):.1f}** | {q(added, n=10)[-1]:.1f} |

The swap is: compare the launch (argv + env) with the running one's (the binary's `--help` is cached), drain (no
request in flight here), SIGTERM the old server and reap it, spawn the new one and poll its /health every 20 ms.
"""
    print(text)
    write_section(SECTION, text)


if __name__ == '__main__':
    asyncio.run(main())
