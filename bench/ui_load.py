"""UI load: the app's own CPU and RSS with 0, 1, 10 and 50 real browser tabs on the dashboard and monitoring pages
at 1 Hz metrics, and the lag from the scheduler's `ready` event to the status on screen. Writes `## UI load` in
docs/BENCHMARKS.md.

    .venv/bin/python bench/ui_load.py [--clients 1,10,50] [--seconds 30] [--settle 10] [--loads 10]

The app runs through its real CLI (`main.py`, as `tests.conftest.start_app` does) over one tiny generated model,
with the sampler at 1 s. Clients are real Chromium tabs (Playwright, system Chromium), each in its own browser
context (its own cookies and NiceGUI storage, like separate users), alternately on `/` and `/monitoring`, added
cumulatively (1, then 9 more, then 40 more). For each count: wait until every tab's socket is up, let it settle,
then measure over a steady window: the app process's CPU (psutil user+sys, that pid only) as % of one core, its RSS
(median of 1 s samples), and the websocket frames each tab received (proof that every tab was being fed).

Lag: a tab on `/models` and one on `/`, each with a MutationObserver (installed before the page's own scripts) that
records `performance.timeOrigin + performance.now()` when a badge reading `ready` first appears, and the next frame
after it; the scheduler's `ready` event comes from `/api/events` (its `ts`, the app's `time.time()` at publish).
Both are this machine's wall clock. Each round unloads the model, waits until no tab shows `ready`, loads it through
`POST /api/models/<id>/load`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section
from tests.conftest import AppProcess, drain_output, start_app, stop_process
from tests.gguf_factory import write_tiny_gguf
from tests.test_browser import ARGS, CHROMIUM

SECTION = '## UI load'
CPU_TARGET_PCT = 5.0  # of one core, at 10 clients
RSS_TARGET_MIB = 2.0  # per client, at 10 clients
LAG_TARGET_MS = 100.0
PAGES = ('/', '/monitoring')  # client i opens PAGES[i % 2]: 1 -> the dashboard, 10 -> 5 + 5, 50 -> 25 + 25
MIB = 2**20

# Installed before any page script: the first time a badge reads `ready` (after the bench resets `at`), and the
# frame after it (what the user sees is painted then).
READY_OBSERVER = """
window.__lap = {at: null, frame: null};
const now = () => performance.timeOrigin + performance.now();
const check = () => {
  if (window.__lap.at !== null) return;
  for (const b of document.querySelectorAll('.q-badge')) {
    if (b.textContent.trim() === 'ready') {
      window.__lap.at = now();
      requestAnimationFrame(() => { window.__lap.frame = now(); });
      return;
    }
  }
};
new MutationObserver(check).observe(document, {subtree: true, childList: true, characterData: true});
"""
SHOWS_READY = "Array.from(document.querySelectorAll('.q-badge')).some(b => b.textContent.trim() === 'ready')"
CONNECTED = 'window.socket && window.socket.connected'


@dataclass
class Tab:
    path: str
    context: Any
    page: Any
    frames: int = 0  # websocket frames received from the app


@dataclass
class Window:
    clients: int
    cpu_pct: float  # the app process, % of one core
    rss_mib: float  # median of 1 s samples over the window
    browser_pct: float  # every Chromium process + the Playwright driver, % of one core
    machine_pct: float  # whole machine, % of all cores
    frames_per_s: list[float] = field(default_factory=list)  # per tab
    connected: int = 0


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def browser_cpu(app_pid: int) -> dict[int, float]:
    """CPU seconds of this process's descendants that are not the app or its children (the browser side)."""
    app_tree = {app_pid}
    with contextlib.suppress(psutil.Error):
        app_tree |= {p.pid for p in psutil.Process(app_pid).children(recursive=True)}
    out = {}
    for p in psutil.Process().children(recursive=True):
        if p.pid in app_tree:
            continue
        with contextlib.suppress(psutil.Error):
            out[p.pid] = cpu_s(p)
    return out


async def measure(app: AppProcess, tabs: list[Tab], seconds: float) -> Window:
    proc = psutil.Process(app.proc.pid)
    frames0 = [t.frames for t in tabs]
    b0 = browser_cpu(proc.pid)
    psutil.cpu_percent(None)
    t0, c0 = time.monotonic(), cpu_s(proc)
    rss = []
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        await asyncio.sleep(min(1.0, end - now))
        rss.append(proc.memory_info().rss)
    c1, t1 = cpu_s(proc), time.monotonic()
    machine = psutil.cpu_percent(None)
    b1 = browser_cpu(proc.pid)
    wall = t1 - t0
    browser = sum(v - b0[pid] for pid, v in b1.items() if pid in b0)
    connected = 0
    for t in tabs:
        with contextlib.suppress(Exception):
            connected += bool(await t.page.evaluate(CONNECTED))
    return Window(
        clients=len(tabs),
        cpu_pct=100 * (c1 - c0) / wall,
        rss_mib=statistics.median(rss) / MIB,
        browser_pct=100 * browser / wall,
        machine_pct=machine,
        frames_per_s=[(t.frames - f0) / wall for t, f0 in zip(tabs, frames0, strict=True)],
        connected=connected,
    )


async def open_tab(browser: Any, base_url: str, path: str, init_script: str | None = None) -> Tab:
    context = await browser.new_context(viewport={'width': 1280, 'height': 800})
    if init_script:
        await context.add_init_script(init_script)
    page = await context.new_page()
    tab = Tab(path, context, page)

    def on_socket(ws: Any) -> None:
        def frame(_payload: Any) -> None:
            tab.frames += 1

        ws.on('framereceived', frame)

    page.on('websocket', on_socket)
    await page.goto(base_url + path)
    await page.wait_for_function(CONNECTED, timeout=60_000)
    return tab


class Events:
    """`/api/events?topics=models` read in the background: every event with the time it arrived."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.events: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())
        while not self.events:  # the snapshot: subscribed
            await asyncio.sleep(0.02)

    async def _run(self) -> None:
        async with (
            httpx.AsyncClient(timeout=None) as client,
            client.stream('GET', self.base_url + '/api/events?topics=models') as r,
        ):
            async for line in r.aiter_lines():
                if line.startswith('data: '):
                    self.events.append(json.loads(line[6:]))

    async def ready_after(self, index: int, model_id: str, deadline_s: float = 60) -> dict[str, Any]:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for e in self.events[index:]:
                d = e.get('data') or {}
                if e.get('type') == 'state' and d.get('model') == model_id and d.get('state') == 'ready':
                    return e
            await asyncio.sleep(0.01)
        raise RuntimeError(f'no ready event for {model_id} within {deadline_s}s')

    def first_state(self, index: int, model_id: str, state: str) -> dict[str, Any] | None:
        for e in self.events[index:]:
            d = e.get('data') or {}
            if e.get('type') == 'state' and d.get('model') == model_id and d.get('state') == state:
                return e
        return None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def ready_lag(browser: Any, app: AppProcess, model_id: str, rounds: int) -> dict[str, list[float]]:
    """Per page: ms from the `ready` event's ts to the badge in the DOM, and to the frame after it."""
    tabs = {
        '/models': await open_tab(browser, app.base_url, '/models', READY_OBSERVER),
        '/': await open_tab(browser, app.base_url, '/', READY_OBSERVER),
    }
    events = Events(app.base_url)
    await events.start()
    out: dict[str, list[float]] = {f'{p} {k}': [] for p in tabs for k in ('dom', 'frame')}
    out['starting -> ready'] = []
    try:
        async with httpx.AsyncClient(base_url=app.base_url, timeout=120) as api:
            for i in range(rounds + 1):  # round 0 warms the page cache, the binary and the pages' code paths
                (await api.post(f'/api/models/{model_id}/unload')).raise_for_status()
                for t in tabs.values():
                    await t.page.wait_for_function(f'!({SHOWS_READY})', timeout=30_000)
                    await t.page.evaluate('window.__lap.at = null; window.__lap.frame = null')
                mark = len(events.events)
                (await api.post(f'/api/models/{model_id}/load')).raise_for_status()
                ready = await events.ready_after(mark, model_id)
                starting = events.first_state(mark, model_id, 'starting')
                for path, t in tabs.items():
                    await t.page.wait_for_function('window.__lap.frame !== null', timeout=30_000)
                    seen = await t.page.evaluate('window.__lap')
                    if i:
                        out[f'{path} dom'].append(seen['at'] - ready['ts'] * 1000)
                        out[f'{path} frame'].append(seen['frame'] - ready['ts'] * 1000)
                if i and starting is not None:
                    out['starting -> ready'].append((ready['ts'] - starting['ts']) * 1000)
            (await api.post(f'/api/models/{model_id}/unload')).raise_for_status()
    finally:
        await events.stop()
        for t in tabs.values():
            await t.context.close()
    return out


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    models = tmp / 'models'
    models.mkdir()
    write_tiny_gguf(models / 'tiny-llama.gguf', name='tiny-llama', seed=1)
    app = start_app(tmp, '--models-dir', str(models), env={'LAP_METRICS_INTERVAL': '1'})
    drain_output(app, tmp / 'app.out')
    result: dict[str, Any] = {'windows': []}
    try:
        model_id = httpx.get(app.base_url + '/api/models', timeout=30).json()
        model_id = (model_id['models'] if isinstance(model_id, dict) else model_id)[0]['id']
        proc = psutil.Process(app.proc.pid)
        await asyncio.sleep(args.settle)  # start-up done: first scan, sampler running
        result['rss_cold_mib'] = proc.memory_info().rss / MIB
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                # Warm-up: each page drawn once and closed, so the first render's one-time cost (imports,
                # templates, the first plotly figure) is not counted per client. Closed tabs are deleted by the app
                # after its reconnect timeout (15 s).
                warm = [await open_tab(browser, app.base_url, path) for path in PAGES]
                await asyncio.sleep(args.settle)
                for t in warm:
                    await t.context.close()
                await asyncio.sleep(20)
                result['rss_warm_mib'] = proc.memory_info().rss / MIB
                result['windows'].append(await measure(app, [], args.seconds))
                tabs: list[Tab] = []
                for n in args.clients:
                    t0 = time.monotonic()
                    while len(tabs) < n:
                        tabs.append(await open_tab(browser, app.base_url, PAGES[len(tabs) % 2]))
                    print(f'{n} tabs connected in {time.monotonic() - t0:.1f} s', flush=True)
                    await asyncio.sleep(args.settle)
                    w = await measure(app, tabs, args.seconds)
                    result['windows'].append(w)
                    print(
                        f'{n} clients: app {w.cpu_pct:.2f} % of a core, RSS {w.rss_mib:.1f} MiB, '
                        f'browser {w.browser_pct:.0f} %, machine {w.machine_pct:.0f} %, {w.connected} connected',
                        flush=True,
                    )
                for t in tabs:
                    await t.context.close()
                await asyncio.sleep(25)  # past the reconnect timeout: every client deleted
                closed = await measure(app, [], args.seconds)
                result['closed'] = closed
                result['lag'] = await ready_lag(browser, app, model_id, args.loads)
            finally:
                await browser.close()
    finally:
        stop_process(app.proc, timeout=30)
    log = (app.data_dir / 'logs' / 'app.log').read_text()
    result['tracebacks'] = log.count('Traceback')
    result['error_lines'] = [line for line in log.splitlines() if ' ERROR ' in line]
    result['errors'] = len(result['error_lines'])
    for line in result['error_lines'][:10]:
        print('app log:', line[:300], flush=True)
    return result


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    windows: list[Window] = r['windows']
    base = windows[0]
    by_n = {w.clients: w for w in windows}
    cmd = (
        f'.venv/bin/python bench/ui_load.py --clients {",".join(map(str, args.clients))} --seconds {args.seconds:g} '
        f'--settle {args.settle:g} --loads {args.loads}'
    )
    lines = [
        SECTION,
        '',
        f'Command: `{cmd}` ({platform.machine()}, {psutil.cpu_count()} cores, Python {platform.python_version()}; '
        'shared, noisy machine).',
        'The app through its real CLI (`main.py`), one tiny generated model (not loaded during the load windows), the',
        'sampler at 1 Hz (`LAP_METRICS_INTERVAL=1`, the default). Clients: real headless Chromium tabs (system',
        'Chromium via Playwright), one browser, each tab in its own browser context, alternately on `/` (dashboard)',
        'and `/monitoring`, added cumulatively; each count settles, then a',
        f'{args.seconds:g} s window measures the app process alone (psutil user+sys of its pid, as % of one core; RSS',
        'the median of 1 s samples). Before the 0-client baseline each page was drawn once and closed, so its one-time',
        f'cost ({r["rss_warm_mib"] - r["rss_cold_mib"]:+.1f} MiB: imports, templates) is not charged per client.',
        "The browser's CPU is not in the app's figure, but Chromium shares the 2 cores with the app: its column and",
        'the whole-machine busy % show how much it competed.',
        '',
        '| clients | app CPU % of one core | RSS MiB | RSS per client MiB | ws frames/s per tab (min-max) '
        '| browser CPU % of one core | machine busy % |',
        '|---|---|---|---|---|---|---|',
    ]
    for w in windows:
        per = '' if not w.clients else f'{(w.rss_mib - base.rss_mib) / w.clients:.2f}'
        fps = f'{min(w.frames_per_s):.1f}-{max(w.frames_per_s):.1f}' if w.frames_per_s else ''
        conn = '' if w.connected == w.clients else f' ({w.connected} connected)'
        lines.append(
            f'| {w.clients}{conn} | {w.cpu_pct:.2f} % | {w.rss_mib:.1f} | {per} | {fps} | '
            f'{w.browser_pct:.0f} % | {w.machine_pct:.0f} % |'
        )
    c = r['closed']
    lines.append(
        f'| 0 (all closed, after the reconnect timeout) | {c.cpu_pct:.2f} % | {c.rss_mib:.1f} | | | '
        f'{c.browser_pct:.0f} % | {c.machine_pct:.0f} % |'
    )
    ns = sorted(by_n)
    marginal = [
        f'{a}->{b}: {(by_n[b].rss_mib - by_n[a].rss_mib) / (b - a):.2f} MiB' for a, b in itertools.pairwise(ns) if a
    ]
    lines += ['', 'Marginal RSS per added client: ' + ', '.join(marginal) + '.', '']

    lag = r['lag']
    lines += [
        f'**Ready to screen** ({args.loads} loads; ms from the `ready` event (`/api/events` `ts`) to the badge reading',
        '`ready` in the DOM (MutationObserver), and to the next frame; one tab on `/models` and one on `/` open',
        'together, no other client)',
        '',
        '| page | to DOM median ms | to DOM max ms | to frame median ms | to frame max ms |',
        '|---|---|---|---|---|',
    ]
    for page in ('/models', '/'):
        dom, frame = lag[f'{page} dom'], lag[f'{page} frame']
        lines.append(
            f'| `{page}` | {statistics.median(dom):.1f} | {max(dom):.1f} | {statistics.median(frame):.1f} '
            f'| {max(frame):.1f} |'
        )

    gap = lag['starting -> ready']
    if gap:
        lines += [
            '',
            f'The `starting` event comes {statistics.median(gap):.0f} ms (median) before `ready`.',
        ]

    lines += [
        '',
        'Where the time goes: pages redraw through `live()` (`ui/layout.py`), at most once per `every_ms` per page',
        "part. The models list, the dashboard's loaded models and the header redraw on `models` events at most every",
        '100 ms (and on `metrics` samples at most every second, for uptime and RSS), so `ready`, which comes shortly',
        'after `starting`, waits at most the rest of that 100 ms, plus one `library.fits()` read off the loop on',
        '`/models`. With a 300 ms and a 1000 ms throttle it waited 246 and 899 ms (median) before.',
    ]

    ten = by_n.get(10)
    verdict = [
        '',
        '| target | result | verdict |',
        '|---|---|---|',
    ]
    if ten is not None:
        per10 = (ten.rss_mib - base.rss_mib) / 10
        verdict += [
            f'| 10 clients: <= {CPU_TARGET_PCT:g} % of one core | {ten.cpu_pct:.2f} % | '
            f'{"met" if ten.cpu_pct <= CPU_TARGET_PCT else "MISSED"} |',
            f'| 10 clients: <= {RSS_TARGET_MIB:g} MB per client | {per10:.2f} MiB | '
            f'{"met" if per10 * MIB <= RSS_TARGET_MIB * 1e6 else "MISSED"} |',
        ]
    for page in ('/models', '/'):
        frame = lag[f'{page} frame']
        med, top = statistics.median(frame), max(frame)
        ok = 'met' if top <= LAG_TARGET_MS else 'median met, max MISSED' if med <= LAG_TARGET_MS else 'MISSED'
        verdict.append(
            f'| ready -> on screen <= {LAG_TARGET_MS:.0f} ms (`{page}`, to frame) | median {med:.1f} ms, '
            f'max {top:.1f} ms | {ok} |'
        )
    lines += verdict
    kinds: dict[str, int] = {}
    for line in r['error_lines']:
        msg = line.split(' ERROR ', 1)[1].strip()
        kinds[msg] = kinds.get(msg, 0) + 1
    said = '; '.join(f'{n}x `{m[:120]}`' for m, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
    lines += ['', f'App log over the run: {r["errors"]} ERROR lines ({said or "none"}), {r["tracebacks"]} tracebacks.']
    fifty = by_n.get(50)
    if fifty is not None and (fifty.connected < 50 or fifty.machine_pct >= 95):
        lines.append(
            f'50 tabs were too much for this machine: Chromium took {fifty.browser_pct:.0f} % of one core, the machine '
            f'was {fifty.machine_pct:.0f} % busy and {50 - fifty.connected} tabs had lost their socket by the end of '
            'the window, so that row is a starved app, not a steady state.'
        )
    lines.append('')
    return '\n'.join(lines)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--clients', type=lambda s: [int(x) for x in s.split(',')], default=[1, 10, 50])
    ap.add_argument('--seconds', type=float, default=30)
    ap.add_argument('--settle', type=float, default=10)
    ap.add_argument('--loads', type=int, default=10)
    ap.add_argument('--no-write', action='store_true', help='print the section, leave docs/BENCHMARKS.md alone')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = await run(args, Path(tmp))
    text = report(args, r)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == '__main__':
    asyncio.run(main())
