"""Cold start: a request for a stopped model -> its first streamed token, through the scheduler, compared with
llama-server's own spawn -> /health -> first token measured directly. Writes `## Cold start` in docs/BENCHMARKS.md.

    .venv/bin/python bench/cold_start.py [--runs 15]

Both paths run the same argv (built by the supervisor) on the same tiny generated model, interleaved so machine
noise hits both alike. The direct path polls /health every 2 ms, so the difference is what the supervisor adds
(its 20 ms health poll, spawn bookkeeping, the pid registry, log readers). Target: <= 100 ms.
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

from bench.report import write_section
from core.settings import SettingsManager
from core.supervisor.argv import LaunchSpec
from core.supervisor.process import free_port
from core.system import System
from tests.gguf_factory import write_tiny_gguf

SECTION = '## Cold start'
TARGET_MS = 100.0
CHAT = {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4, 'stream': True}


async def first_token(client: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> None:
    headers = {'Authorization': f'Bearer {api_key}'} if api_key else None
    async with client.stream('POST', f'{base_url}/v1/chat/completions', json=CHAT, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith('data: ') and '"content"' in line:
                return
    raise RuntimeError('no token streamed')


async def direct(system: System, model: Path, client: httpx.AsyncClient) -> tuple[float, float]:
    """(spawn -> /health 200, spawn -> first token) in ms for llama-server alone."""
    binary = system.binary.resolve()
    assert binary is not None
    spec = LaunchSpec(binary.path, model, None, system.scheduler.params_for('x'))
    port = free_port()
    argv = spec.argv(port, system.binary.help_text())
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=binary.child_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    deadline = time.perf_counter() + 60
    try:
        while True:
            if proc.returncode is not None or time.perf_counter() > deadline:
                raise RuntimeError(f'llama-server did not become healthy (exit code {proc.returncode})')
            try:
                if (await client.get(f'http://127.0.0.1:{port}/health')).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.002)
        healthy = time.perf_counter()
        await first_token(client, f'http://127.0.0.1:{port}')
        done = time.perf_counter()
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except TimeoutError:  # it can miss a SIGTERM sent right after start-up
            proc.kill()
            await proc.wait()
    return (healthy - t0) * 1000, (done - t0) * 1000


async def through_scheduler(system: System, model_id: str, client: httpx.AsyncClient) -> float:
    """Request for a stopped model -> first token, through `Scheduler.lease`, in ms."""
    t0 = time.perf_counter()
    async with system.scheduler.lease(model_id) as up:
        await first_token(client, up.base_url, up.api_key)
    elapsed = (time.perf_counter() - t0) * 1000
    await system.scheduler.unload(model_id)
    return elapsed


async def tiny_system(tmp: Path) -> tuple[System, Path, str]:
    """A started System (no web server) over the tiny generated model in `tmp`: (system, model file, model id)."""
    models = tmp / 'models'
    models.mkdir()
    model = write_tiny_gguf(models / 'tiny-llama.gguf', name='tiny-llama', seed=1)
    config = SettingsManager(
        config_path=tmp / 'config.json',
        cli={'data_dir': tmp / 'data', 'models_dirs': [models], 'scan_well_known_dirs': False},
        env_file=tmp / 'none.env',
    )
    system = System(config)
    await system.start()
    return system, model, next(e.id for e in system.library.models() if Path(e.path) == model)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        system, model, model_id = await tiny_system(Path(tmp_s))
        try:
            health, direct_tok, sched_tok = [], [], []
            async with httpx.AsyncClient(timeout=30) as client:
                await direct(system, model, client)  # warm the page cache and the binary
                await through_scheduler(system, model_id, client)
                for _ in range(args.runs):
                    h, d = await direct(system, model, client)
                    health.append(h)
                    direct_tok.append(d)
                    sched_tok.append(await through_scheduler(system, model_id, client))
        finally:
            await system.stop()
    overhead = [s - d for s, d in zip(sched_tok, direct_tok, strict=True)]
    med = statistics.median
    q = statistics.quantiles
    text = f"""{SECTION}

Command: `.venv/bin/python bench/cold_start.py --runs {args.runs}` ({platform.machine()}, Python \
{platform.python_version()}; shared, noisy 2-core machine). Tiny generated model (`tests/gguf_factory.py`),
real llama-server, same argv both ways, runs interleaved. Target: supervisor overhead <= {TARGET_MS:.0f} ms.

| path | median ms | p90 ms |
|---|---|---|
| llama-server alone: spawn -> /health 200 | {med(health):.1f} | {q(health, n=10)[-1]:.1f} |
| llama-server alone: spawn -> first token | {med(direct_tok):.1f} | {q(direct_tok, n=10)[-1]:.1f} |
| scheduler: request for a stopped model -> first token | {med(sched_tok):.1f} | {q(sched_tok, n=10)[-1]:.1f} |
| **overhead** (scheduler - alone, per pair) | **{med(overhead):.1f}** | {q(overhead, n=10)[-1]:.1f} |

Overhead is {'within' if med(overhead) <= TARGET_MS else 'OVER'} the target. Most of it is the 20 ms /health \
poll interval (the direct path polls every 2 ms) plus one pid-registry write (fsync) per spawn.
"""
    print(text)
    write_section(SECTION, text)


if __name__ == '__main__':
    asyncio.run(main())
