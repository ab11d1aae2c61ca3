"""Where one proxied request spends its time: per-stage medians of timestamps taken inside the proxy process.

    .venv/bin/python bench/proxy_timeline.py [--seconds 5] [--no-write]

A diagnostic beside `bench/proxy_overhead.py` (which measures what a client sees). The System and its HTTP surface
run in this process under uvicorn on uvloop, wired as main.py wires them minus the pages; the scripted upstream
(`bench/scripted_upstream.py`) answers at once; a load client in a subprocess sends sequential requests (c=1).
Timestamps (`perf_counter`) are taken by wrapping: uvicorn's `data_received` (the request arrives), the proxy's
handler, the upstream client's socket write, the upstream connection's `data_received`, and the ASGI sends of
the reply. Each wrapper costs ~1 us, so the stages are a little longer than without them; the shares are what
matter. Writes `## Proxy request timeline` in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section
from tests.gguf_factory import write_tiny_gguf

SECTION = '## Proxy request timeline'
MODEL = 'scripted-fast'
BODIES = {
    'chat': (
        '/v1/chat/completions',
        {'model': MODEL, 'messages': [{'role': 'user', 'content': 'Say something.'}], 'max_tokens': 1},
    ),
    'embeddings': ('/v1/embeddings', {'model': MODEL, 'input': 'hello'}),
}
STAGES = (
    ('in', 'parsed', 'uvicorn parses the request, creates the task'),
    ('parsed', 'handler', 'the task starts: front door, guards'),
    ('handler', 'up_write', 'proxy: body, route, params, activity, lease, request head'),
    ('up_write', 'up_written', 'the write to the upstream socket'),
    ('up_written', 'up_first', '(the upstream works; not the proxy)'),
    ('up_first', 'up_last', 'first to last upstream read (a stream comes in pieces; the proxy reads the first)'),
    ('up_last', 'reply', 'proxy: finish the reply (relay, or assemble the stream)'),
    ('reply', 'done', 'the reply goes out: head and body, two socket writes'),
)


# ---- the load client (a subprocess) -----------------------------------------------------------------------------
def client(port: int, kind: str, seconds: float) -> None:
    import aiohttp
    import uvloop

    path, body = BODIES[kind]

    async def run() -> None:
        n, end = 0, time.perf_counter() + seconds
        async with aiohttp.ClientSession() as s:
            while time.perf_counter() < end:
                async with s.post(f'http://127.0.0.1:{port}{path}', json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f'HTTP {r.status}: {await r.text()}')
                n += 1
        print(n)

    uvloop.run(run())


# ---- the instrumented server ------------------------------------------------------------------------------------
def instrument(stamps: dict[str, float], rows: list[dict[str, float]]) -> None:
    import uvicorn.protocols.http.httptools_impl as httptools_impl

    from core.proxy import asgi, service, upstream

    now = time.perf_counter

    def wrap(owner: Any, name: str, before: str | None = None, after: str | None = None, first: bool = False) -> None:
        orig = getattr(owner, name)
        if asyncio.iscoroutinefunction(orig):

            async def awrapped(*a: Any, **k: Any) -> Any:
                if before:
                    stamps[before] = now()
                return await orig(*a, **k)

            setattr(owner, name, awrapped)
            return

        def wrapped(*a: Any, **k: Any) -> Any:
            if before and not (first and before in stamps):
                stamps[before] = now()
            result = orig(*a, **k)
            if after:
                stamps[after] = now()
            return result

        setattr(owner, name, wrapped)

    orig_in = httptools_impl.HttpToolsProtocol.data_received

    def request_in(self: Any, data: bytes) -> None:
        stamps.clear()
        stamps['in'] = now()
        orig_in(self, data)
        stamps['parsed'] = now()

    httptools_impl.HttpToolsProtocol.data_received = request_in  # type: ignore[method-assign]
    wrap(service.Proxy, 'handle_v1', before='handler')
    wrap(upstream._Connection, 'send', before='up_write', after='up_written')
    wrap(upstream._Connection, 'data_received', before='up_first', first=True)
    wrap(upstream._Connection, 'data_received', after='up_last')
    orig_call = asgi.Reply._call

    async def reply_call(self: Any, message: dict[str, Any]) -> None:
        if message['type'] == 'http.response.start':
            stamps['reply'] = now()
        await orig_call(self, message)
        if message['type'] == 'http.response.body' and not message.get('more_body'):
            stamps['done'] = now()
            if all(a in stamps for a, _, _ in STAGES):
                rows.append(dict(stamps))

    asgi.Reply._call = reply_call  # type: ignore[method-assign]


async def serve_and_measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    import uvicorn
    from fastapi import FastAPI

    from core.api import include_all
    from core.httpguard import uvicorn_options
    from core.llama_binary import BinaryResolver
    from core.settings import Settings, SettingsManager
    from core.system import System

    stamps: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    instrument(stamps, rows)

    models = tmp / 'models'
    models.mkdir()
    write_tiny_gguf(models / f'{MODEL}.gguf', name=MODEL, seed=3)
    wrapper = tmp / 'llama-server'
    real = BinaryResolver(SimpleNamespace(settings=Settings(scan_well_known_dirs=False)), tmp / 'bin-data').resolve()
    if real is None:
        raise SystemExit('llama-server not found (the scripted upstream answers --version through it)')
    # In the script: a child's environment holds only what the launch policy lets through.
    script = f'BENCH_REAL_LLAMA_SERVER={real.path} exec {sys.executable} {ROOT / "bench" / "scripted_upstream.py"}'
    wrapper.write_text(f'#!/bin/sh\n{script} "$@"\n')
    wrapper.chmod(0o755)
    os.environ.update(real.child_env())
    config = {'models_dirs': [str(models)], 'scan_well_known_dirs': False, 'llama_server_path': str(wrapper)}
    (tmp / 'config.json').write_text(json.dumps(config))
    system = System(SettingsManager(config_path=tmp / 'config.json', cli={'data_dir': tmp / 'data'}))
    await system.start()
    server: Any = None
    task: asyncio.Task[None] | None = None
    try:
        await system.scheduler.load(MODEL)
        app = FastAPI()
        app.state.system = system
        include_all(app)
        system.frontdoor.install(app)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host='127.0.0.1',
                port=port,
                log_level='warning',
                lifespan='off',
                proxy_headers=False,
                **uvicorn_options(system.config.settings),  # as main.py runs it
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        out = {}
        for kind in BODIES:
            rows.clear()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, '--client', str(port), kind, str(args.seconds), stdout=subprocess.PIPE
            )
            stdout, _ = await proc.communicate()
            if proc.returncode:
                raise SystemExit(f'load client failed for {kind}')
            kept = rows[len(rows) // 10 :]  # the first tenth warms up
            out[kind] = {f'{a}>{b}': statistics.median((r[b] - r[a]) * 1e6 for r in kept) for a, b, _ in STAGES}
            out[kind]['total'] = statistics.median((r['done'] - r['in']) * 1e6 for r in kept)
            out[kind]['requests'] = float(stdout.decode().strip() or 0)
        return out
    finally:
        if server is not None:
            server.should_exit = True
        if task is not None:
            await task
        await system.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def render(res: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    meta = f'{platform.machine()}, Python {platform.python_version()}; shared, noisy 2-core machine'
    kinds = list(BODIES)
    lines = [
        SECTION,
        '',
        f'Command: `.venv/bin/python bench/proxy_timeline.py --seconds {args.seconds:g}` ({meta}).',
        'Medians of per-stage timestamps inside the proxy process at concurrency 1 (scripted upstream, no pages):',
        "what the proxy adds is every stage but the upstream's own work. Chat is non-streaming, so the proxy asks",
        'the upstream for a stream and assembles the reply.',
        '',
        '| stage | ' + ' | '.join(f'{k} us' for k in kinds) + ' |',
        '|---|' + '---|' * len(kinds),
    ]
    for a, b, label in STAGES:
        lines.append(f'| {label} | ' + ' | '.join(f'{res[k][f"{a}>{b}"]:.1f}' for k in kinds) + ' |')
    lines.append(
        '| **in the proxy process, request in to reply out** | '
        + ' | '.join(f'{res[k]["total"]:.1f}' for k in kinds)
        + ' |'
    )
    lines.append('| requests measured | ' + ' | '.join(f'{res[k]["requests"]:.0f}' for k in kinds) + ' |')
    return '\n'.join(lines) + '\n'


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--client':
        client(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--seconds', type=float, default=5, help='load per request kind')
    ap.add_argument('--no-write', action='store_true', help='print only; leave docs/BENCHMARKS.md alone')
    args = ap.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        res = uvloop.run(serve_and_measure(args, Path(tmp)))
    text = render(res, args)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == '__main__':
    main()
