"""Soak: mixed traffic for a long while, and proof that nothing in the app grows. Writes `## Soak` in
docs/BENCHMARKS.md (unless --no-write).

    .venv/bin/python bench/soak.py [--seconds 1800] [--warmup 300] [--sample 60] [--check] [--json out.json]

The app runs through its real CLI (`main.py`) over two tiny generated models with `max_loaded_models=1`, so a request
for the other model swaps them. Four workers send, nonstop: non-streaming chat, whole streams, streams the client
drops after a few chunks, plain requests it gives up on after 5 ms (both disconnects), embeddings; mostly to the
model of the moment (which changes every 10 s), some to the other. Every 15 s (at most) a config change lands in
turn: a global setting, a model's `ctx_size` (its server restarts), an unload. A real Chromium tab (Playwright)
keeps the dashboard open throughout, and another the monitoring page.

Every `--sample` seconds `GET /api/health/runtime` gives the app process's RSS, open file descriptors, threads,
asyncio tasks, running children, event subscriptions and the data dir's SQLite and log bytes. After the warm-up
each must stay flat: counts no higher than during the warm-up (plus a slack for what is in flight at that moment),
RSS within 16 MiB (or 5 %) of its first value after the warm-up, disk within its bounds (`requests_keep` rows,
rotated logs). `--check` exits 1 when one does not hold or a request got a 5xx (but the 503 of one that waited for
a load the soak's own unload cancelled, the defined outcome), an ERROR was logged, or a stop waited out its timeout;
the 60-second variant in the test suite (`tests/faults/test_soak.py`) runs with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section
from tests.conftest import drain_output, start_app, stop_process
from tests.gguf_factory import write_tiny_gguf

SECTION = '## Soak'
DESCRIPTION = (
    'The app through its CLI over two tiny generated models, `max_loaded_models=1`; 4 workers nonstop: chat, '
    'streams, streams cut after 3 chunks, plain requests given up after 5 ms, embeddings, 90 % to the model of '
    'the moment (it changes every 10 s, so they swap), 10 % to the other; every 15 s a global setting, a '
    "model's ctx_size (a restart) or an unload, in turn; Chromium tabs on the dashboard and monitoring pages "
    'throughout. Figures from `GET /api/health/runtime` (the app process only) each sample; "tasks" = asyncio '
    'tasks, "subscribers" = core event subscriptions.'
)
MODELS = ('soak-a', 'soak-b')
WORKERS = 4
SWAP_EVERY_S = 10.0  # the model most requests go to changes this often
CONFIG_EVERY_S = 15.0
REQUESTS_KEEP = 500  # reached within seconds, so the table's size is flat after the warm-up
WAL_BOUND = 8 * 2**20
LOG_FILE_MAX_BYTES = 1 << 20
LOG_FILE_BACKUPS = 2
MIB = 2**20
# Slack over the warm-up's highest value, for what is in flight when a sample is taken (a request holds a task,
# a connection to the client and one to its llama-server; a swap a child for a moment).
SLACK = {'open_fds': 2 * WORKERS + 8, 'threads': 4, 'asyncio_tasks': 3 * WORKERS + 4, 'children': 1}
RSS_SLACK_MIB, RSS_SLACK_FRACTION = 16.0, 0.05
CHAT = {'messages': [{'role': 'user', 'content': 'Tell me about the sea.'}], 'max_tokens': 16}
OPS = {'chat': 35, 'stream': 20, 'stream_cut': 15, 'plain_cut': 10, 'embeddings': 20}


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # the first few 5xx bodies, to say what they were

    def add(self, op: str, status: int | str, body: str = '') -> None:
        if status == 503 and 'unloaded while loading' in body:
            op = 'unloaded while loading'
        self.outcomes[f'{op} {status}'] += 1
        if (
            isinstance(status, int)
            and status >= 500
            and op != 'unloaded while loading'
            and len(self.server_errors) < 10
        ):
            self.server_errors.append(f'{op} {status}: {body[:300]}')

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def five_xx(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.split()[-1].isdigit() and int(k.split()[-1]) >= 500)

    @property
    def unloaded(self) -> int:
        """503s that the soak's own unloads cause, by design: requests that waited for a load an unload cancelled
        (issue 14: "an unload during a load cancels the load ... with a clear error")."""
        return self.outcomes['unloaded while loading 503']


def model_now(rng: random.Random) -> str:
    hot = int(time.monotonic() // SWAP_EVERY_S) % 2
    return MODELS[hot if rng.random() < 0.9 else 1 - hot]


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    op = rng.choices(list(OPS), weights=list(OPS.values()))[0]
    model = model_now(rng)
    if op == 'embeddings':
        r = await client.post('/v1/embeddings', json={'model': model, 'input': 'the sea'})
        tally.add(op, r.status_code, r.text)
    elif op == 'chat':
        r = await client.post('/v1/chat/completions', json={'model': model, **CHAT})
        tally.add(op, r.status_code, r.text)
    elif op == 'plain_cut':  # the client gives up before the answer: a disconnect during a plain request
        try:
            r = await client.post(
                '/v1/chat/completions', json={'model': model, **CHAT, 'max_tokens': 64}, timeout=0.005
            )
            tally.add(op, r.status_code, r.text)
        except httpx.TimeoutException:
            tally.add(op, 'cut')
    else:
        body = {'model': model, **CHAT, 'stream': True, 'max_tokens': 64 if op == 'stream_cut' else 16}
        async with client.stream('POST', '/v1/chat/completions', json=body) as r:
            if r.status_code != 200:
                tally.add(op, r.status_code, (await r.aread()).decode(errors='replace'))
                return
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith('data: ')
                if op == 'stream_cut' and chunks >= 3:
                    tally.add(op, 'cut')  # leaving the block closes the connection mid-stream
                    return
                if line == 'data: [DONE]':
                    tally.add(op, 200)
                    return
            tally.add(op, 'ended without [DONE]')


async def worker(base: str, seed: int, tally: Tally, until: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        while time.monotonic() < until:
            try:
                await one_request(client, rng, tally)
            except httpx.HTTPError as e:
                tally.add('transport', type(e).__name__)


async def config_changes(base: str, tally: Tally, until: float) -> None:
    """A global setting, a model's launch (its server restarts after its requests drain), an unload, in turn."""
    changes = [
        lambda c, i: c.put('/api/config', json={'sse_heartbeat': 15 + i % 2 * 5}),
        lambda c, i: c.put(f'/api/models/{MODELS[1]}/parameters', json=model_params(1024 if i % 2 else 2048)),
        lambda c, i: c.post(f'/api/models/{MODELS[i % 2]}/unload'),
    ]
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        i = 0
        while time.monotonic() + CONFIG_EVERY_S < until:
            await asyncio.sleep(CONFIG_EVERY_S)
            kind = ('config', 'params', 'unload')[i % 3]
            r = await changes[i % 3](client, i // 3)
            tally.add(kind, r.status_code, r.text)
            i += 1


def model_params(ctx: int) -> dict[str, Any]:
    return {'ctx_size': ctx, 'parallel': 2, 'threads': 1, 'embeddings': True, 'pooling': 'mean'}


class Dashboard:
    """Real Chromium tabs on `/` and `/monitoring` for the whole run (Playwright, system Chromium)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._stack = contextlib.AsyncExitStack()
        self.pages: list[Any] = []

    async def open(self, base: str) -> None:
        from playwright.async_api import async_playwright

        from tests.test_browser import ARGS, CHROMIUM

        p = await self._stack.enter_async_context(async_playwright())
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        self._stack.push_async_callback(browser.close)
        for path in ('/', '/monitoring'):
            page = await browser.new_page(viewport={'width': 1440, 'height': 900})
            page.on('console', lambda m: m.type == 'error' and self.errors.append(m.text))
            page.on('pageerror', lambda e: self.errors.append(str(e)))
            await page.goto(base + path)
            await page.wait_for_function('window.socket && window.socket.connected', timeout=30_000)
            self.pages.append(page)

    async def connected(self) -> bool:
        return all([await p.evaluate('!!(window.socket && window.socket.connected)') for p in self.pages])

    async def close(self) -> None:
        await self._stack.aclose()


async def sampler(base: str, every: float, until: float, t0: float, tally: Tally, out: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while True:
            r = await client.get('/api/health/runtime')
            r.raise_for_status()
            out.append({'t': round(time.monotonic() - t0, 1), 'requests': tally.requests, **r.json()})
            if time.monotonic() + every > until + 0.5:
                return
            await asyncio.sleep(every)


def verdicts(samples: list[dict[str, Any]], warmup: float, tally: Tally, dashboard_ok: bool | None) -> list[dict]:
    warm = [s for s in samples if s['t'] <= warmup]
    after = [s for s in samples if s['t'] > warmup]
    out: list[dict[str, Any]] = []

    def check(what: str, result: str, ok: bool) -> None:
        out.append({'check': what, 'result': result, 'ok': ok})

    if not warm or len(after) < 2:
        check('samples', f'{len(warm)} in the warm-up, {len(after)} after', False)
        return out
    for key, slack in SLACK.items():
        if warm[0].get(key) is None:
            continue
        peak_warm, peak_after = max(s[key] for s in warm), max(s[key] for s in after)
        check(
            f'{key}: highest after the warm-up <= highest during it + {slack}',
            f'{peak_warm} -> {peak_after} (last {after[-1][key]})',
            peak_after <= peak_warm + slack,
        )
    subs_warm, subs_after = max(s['event_subscribers'] for s in warm), max(s['event_subscribers'] for s in after)
    check('event subscriptions: none added after the warm-up', f'{subs_warm} -> {subs_after}', subs_after <= subs_warm)
    first, last = after[0]['rss_bytes'] / MIB, after[-1]['rss_bytes'] / MIB
    allowed = max(RSS_SLACK_MIB, first * RSS_SLACK_FRACTION)
    hours = (after[-1]['t'] - after[0]['t']) / 3600
    slope = (last - first) / hours if hours else 0.0
    check(
        f'RSS: within {allowed:.0f} MiB of its first value after the warm-up',
        f'{first:.1f} -> {last:.1f} MiB ({slope:+.1f} MiB/h)',
        last - first <= allowed,
    )
    logs_bound = 2 * (LOG_FILE_BACKUPS + 1) * LOG_FILE_MAX_BYTES + MIB  # app.log and llama-server.log, rotated
    peak_logs = max(s['disk_bytes']['logs'] for s in samples)
    check(
        'log files: within their rotation bound',
        f'{peak_logs / MIB:.1f} MiB <= {logs_bound / MIB:.0f}',
        peak_logs <= logs_bound,
    )
    sql_warm = max(s['disk_bytes']['sqlite'] for s in warm)
    sql_after = max(s['disk_bytes']['sqlite'] for s in after)
    check(
        f'SQLite database (requests_keep={REQUESTS_KEEP}): <= 1.25 x the warm-up + 1 MiB',
        f'{sql_warm / MIB:.2f} -> {sql_after / MIB:.2f} MiB',
        sql_after <= 1.25 * sql_warm + MIB,
    )
    wal = max(s['disk_bytes']['sqlite_wal'] for s in samples)
    check(  # SQLite checkpoints every 1000 pages (4 KiB each) and then reuses the file from its start
        'SQLite WAL: within its checkpoint bound (1000 pages, and a margin)',
        f'{wal / MIB:.2f} <= {WAL_BOUND / MIB:.0f} MiB',
        wal <= WAL_BOUND,
    )
    unexpected = tally.five_xx - tally.unloaded
    check(
        'no 5xx but the 503s of requests waiting on a load the soak unloaded',
        f'{unexpected} of {tally.requests} ({tally.unloaded} "unloaded while loading")',
        unexpected == 0,
    )
    if dashboard_ok is not None:
        check('the dashboard tabs are still connected at the end', str(dashboard_ok), dashboard_ok)
    return out


async def soak(seconds: float, warmup: float, every: float, browser: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix='lap-soak-'))
    models = tmp / 'models'
    models.mkdir()
    for i, name in enumerate(MODELS):
        write_tiny_gguf(models / f'{name}.gguf', name=name, seed=i + 1)
    config = {'max_loaded_models': 1, 'requests_keep': REQUESTS_KEEP, 'models': {m: model_params(2048) for m in MODELS}}
    (tmp / 'app-config.json').write_text(json.dumps(config))
    env = {'LAP_LOG_FILE_MAX_BYTES': str(LOG_FILE_MAX_BYTES), 'LAP_LOG_FILE_BACKUPS': str(LOG_FILE_BACKUPS)}
    app = start_app(tmp, '--models-dir', str(models), env=env)
    drain_output(app, tmp / 'app-output.log')
    tally = Tally()
    samples: list[dict[str, Any]] = []
    dashboard = Dashboard() if browser else None
    try:
        if dashboard is not None:
            await dashboard.open(app.base_url)
        t0 = time.monotonic()
        until = t0 + seconds
        tasks = [worker(app.base_url, seed, tally, until) for seed in range(WORKERS)]
        await asyncio.gather(
            sampler(app.base_url, every, until, t0, tally, samples), config_changes(app.base_url, tally, until), *tasks
        )
        dashboard_ok = await dashboard.connected() if dashboard is not None else None
        console_errors = list(dashboard.errors) if dashboard is not None else []
    finally:
        if dashboard is not None:
            await dashboard.close()
        stop_process(app.proc, timeout=30)
    result = {
        'seconds': seconds,
        'warmup': warmup,
        'samples': samples,
        'outcomes': dict(sorted(tally.outcomes.items())),
        'server_errors': tally.server_errors,
        'console_errors': console_errors,
        'exit_code': app.proc.returncode,
    }
    result['verdicts'] = verdicts(samples, warmup, tally, dashboard_ok)
    said = (tmp / 'app-output.log').read_text(errors='replace').splitlines()
    result['app_warnings'] = [ln for ln in said if ' WARNING ' in ln]
    errors = [ln for ln in said if ' ERROR ' in ln or ln.startswith('Traceback')]
    result['verdicts'].append(
        {'check': "no error in the app's own log", 'result': errors[0] if errors else 'none', 'ok': not errors}
    )
    # A server that did not hear its first SIGTERM (it lands during start-up) exits at the second, or is killed
    # 1 s after it: bounded, and counted. One that waited out stop_timeout is what must not happen.
    quick = [ln for ln in result['app_warnings'] if 'terminating immediately' in ln]
    waited = [ln for ln in result['app_warnings'] if 'no exit' in ln and 'after SIGTERM' in ln]
    result['verdicts'].append(
        {
            'check': 'no stop waited out its stop_timeout',
            'result': waited[0] if waited else f'none ({len(quick)} killed 1 s after a second SIGTERM)',
            'ok': not waited,
        }
    )
    if console_errors:
        result['verdicts'].append({'check': 'no console errors in the tabs', 'result': console_errors[0], 'ok': False})
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    s = result['samples']
    lines = [
        SECTION,
        '',
        f'Command: `{command}` ({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; '
        f'shared, noisy machine). {DESCRIPTION}',
        '',
        '| min | requests | RSS MiB | fds | threads | tasks | children | subscribers | SQLite MiB | WAL MiB '
        '| logs MiB |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for x in s:
        lines.append(
            f'| {x["t"] / 60:.1f} | {x["requests"]} | {x["rss_bytes"] / MIB:.1f} | {x["open_fds"]} | {x["threads"]} '
            f'| {x["asyncio_tasks"]} | {x["children"]} | {x["event_subscribers"]} '
            f'| {x["disk_bytes"]["sqlite"] / MIB:.2f} | {x["disk_bytes"]["sqlite_wal"] / MIB:.2f} '
            f'| {x["disk_bytes"]["logs"] / MIB:.2f} |'
        )
    total = sum(result['outcomes'].values())
    rate = total / result['seconds'] if result['seconds'] else 0
    lines += [
        '',
        f'Requests: {total} ({rate:.0f}/s) — ' + ', '.join(f'{k}: {n}' for k, n in result['outcomes'].items()),
    ]
    lines += ['', '| check | result | verdict |', '|---|---|---|']
    lines += [f'| {v["check"]} | {v["result"]} | {"met" if v["ok"] else "MISSED"} |' for v in result['verdicts']]
    return '\n'.join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seconds', type=float, default=1800)
    ap.add_argument('--warmup', type=float, default=300)
    ap.add_argument('--sample', type=float, default=60)
    ap.add_argument('--no-browser', action='store_true', help='no dashboard tabs (no Chromium here)')
    ap.add_argument('--check', action='store_true', help='exit 1 if a check fails')
    ap.add_argument('--json', type=Path, help='write the raw result here')
    ap.add_argument('--no-write', action='store_true', help='do not write docs/BENCHMARKS.md')
    args = ap.parse_args()
    result = asyncio.run(soak(args.seconds, args.warmup, args.sample, not args.no_browser))
    command = '.venv/bin/python ' + ' '.join(['bench/soak.py', *sys.argv[1:]])
    text = markdown(result, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_write:
        write_section(SECTION, text)
    failed = [v for v in result['verdicts'] if not v['ok']]
    if result['server_errors']:
        print('\n5xx bodies:\n' + '\n'.join(result['server_errors']), file=sys.stderr)
    return 1 if args.check and failed else 0


if __name__ == '__main__':
    raise SystemExit(main())
