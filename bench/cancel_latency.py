"""How soon llama-server stops a request whose client went away: plain or streamed, during prompt processing or
generation, on a quiet server or one with other traffic. Writes `## Cancel latency` in docs/BENCHMARKS.md.

    .venv/bin/python bench/cancel_latency.py [--trials 3] [--no-write]

This is what decides how the proxy forwards a non-streaming request (`core/proxy/slot_time.py`). One llama-server
(`-np 2 -t 1 -b 64`, a generated model whose ~9k-token prompt takes seconds) gets a request on a raw socket; the
socket is closed with a reset 0.3 s (prompt) or 0.5 s (generation) in; the figure is the time from the close until
a one-token request pinned to the same slot (`id_slot`) is answered. The probe posts no result while it waits (a
`/slots` poll would: it is traffic too). Other traffic: a second slot streams tokens meanwhile (what any other
client does), or `/metrics` is scraped every 0.5 s (what the app's sampler does).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy_overhead import free_port, wait_http
from bench.report import write_section
from core.llama_binary import BinaryResolver
from core.settings import Settings
from tests.gguf_factory import write_tiny_gguf

SECTION = '## Cancel latency'
LONG_PROMPT = ' '.join(f'w{i}' for i in range(3000))
UNCANCELLED_S = 10.0  # a probe waits this long at most; then the server is restarted


def raw_request(port: int, path: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    head = f'POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n'
    return head.encode() + b'content-length: %d\r\n\r\n' % len(data) + data


class Server:
    def __init__(self, tmp: Path) -> None:
        resolver = BinaryResolver(SimpleNamespace(settings=Settings(scan_well_known_dirs=False)), tmp / 'bin-data')
        binary = resolver.resolve()
        if binary is None:
            raise SystemExit(f'llama-server not found: {resolver.how_to_install()}')
        model = tmp / 'slow.gguf'
        write_tiny_gguf(model, name='slow', seed=5, ctx=16384, n_embd=384, n_ff=1536)
        self.port = free_port()
        argv = [str(binary.path), '-m', str(model), '--port', str(self.port), '-c', '32768', '-np', '2', '-t', '1']
        argv += ['-b', '64', '-ub', '64', '--threads-http', '8', '--metrics']
        self.proc = subprocess.Popen(argv, env=binary.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f'http://127.0.0.1:{self.port}/health', 60, self.proc)
        self.url = f'http://127.0.0.1:{self.port}'

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def freed_after(server: Server, body: dict[str, object], close_after: float) -> float | None:
    """Seconds from the reset of a request's connection until its slot serves a one-token request; None when
    it did not within UNCANCELLED_S."""
    with httpx.Client(base_url=server.url, timeout=UNCANCELLED_S) as probe:
        probe.get('/health')  # connected before the clock starts
        sock = socket.create_connection(('127.0.0.1', server.port))
        sock.sendall(raw_request(server.port, '/completion', {**body, 'id_slot': 0}))
        time.sleep(close_after)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        sock.close()
        t0 = time.perf_counter()
        try:
            probe.post('/completion', json={'prompt': 'x', 'n_predict': 1, 'id_slot': 0}).raise_for_status()
        except httpx.TimeoutException:
            return None
    return time.perf_counter() - t0


class Traffic:
    """Background load while a trial runs: another slot's stream, or a scrape of /metrics every 0.5 s."""

    def __init__(self, server: Server, kind: str) -> None:
        self.server, self.kind = server, kind
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> Traffic:
        if self.kind != 'quiet':
            self.thread.start()
            time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as c:
            while not self.stop.is_set():
                if self.kind == 'scrape':
                    c.get('/metrics')
                    self.stop.wait(0.5)
                    continue
                body = {'prompt': 'hi', 'n_predict': 200000, 'ignore_eos': True, 'stream': True, 'id_slot': 1}
                with c.stream('POST', '/completion', json=body) as r:
                    for _ in r.iter_lines():
                        if self.stop.is_set():
                            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--trials', type=int, default=3)
    ap.add_argument('--no-write', action='store_true')
    args = ap.parse_args()
    t_start = time.perf_counter()
    phases = {
        'prompt': ({'prompt': LONG_PROMPT, 'n_predict': 4}, 0.3),
        'generation': ({'prompt': 'hi', 'n_predict': 100000, 'ignore_eos': True}, 0.5),
    }
    modes = {'plain': {}, 'stream': {'stream': True, 'return_progress': True}}
    results: dict[tuple[str, str, str], list[float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                t0 = time.perf_counter()
                c.post('/completion', json={'prompt': LONG_PROMPT, 'n_predict': 1, 'cache_prompt': False})
                prompt_s = time.perf_counter() - t0
            for traffic in ('quiet', 'stream', 'scrape'):
                for phase, (body, after) in phases.items():
                    for mode, extra in modes.items():
                        xs: list[float | None] = []
                        for _ in range(args.trials):
                            with Traffic(server, traffic):
                                xs.append(freed_after(server, {**body, **extra, 'cache_prompt': False}, after))
                            if xs[-1] is None:  # still at it: start afresh
                                server.close()
                                server = Server(Path(tmp))
                        results[(traffic, phase, mode)] = xs
                        print(traffic, phase, mode, xs, file=sys.stderr)
        finally:
            server.close()
    lines = [
        SECTION,
        '',
        f'Command: `.venv/bin/python bench/cancel_latency.py --trials {args.trials}` ({platform.machine()}, '
        f'Python {platform.python_version()}; whole run {time.perf_counter() - t_start:.0f} s).',
        *__doc__.split('\n\n')[2].splitlines(),
        f'Uncancelled, the prompt takes {prompt_s:.2f} s; a generation runs for minutes.',
        '',
        '| other traffic | phase | request | seconds until the slot is free (median) | trials (- = not stopped) |',
        '|---|---|---|---|---|',
    ]
    for (traffic, phase, mode), xs in results.items():
        stopped = [x for x in xs if x is not None]
        shown = f'not stopped in {UNCANCELLED_S:g} s'
        if len(stopped) * 2 > len(xs):
            shown = f'{statistics.median(stopped):.2f}'
            if phase == 'prompt' and statistics.median(stopped) > 0.8 * (prompt_s - phases[phase][1]):
                shown += ' (ran to the end)'
        each = ' '.join('-' if x is None else f'{x:.2f}' for x in xs)
        lines.append(f'| {traffic} | {phase} | {mode} | {shown} | {each} |')
    lines += [
        '',
        'Reading it: a stream is stopped at its next write (a token, or with `return_progress` the chunk after each',
        "prompt batch). A plain request's closed connection is seen only when llama-server's 1 s wait for that",
        "task's result times out with no result for any task: on a quiet server about a second after it was sent,",
        "under other traffic late or not at all. Hence the proxy's rule: a non-streaming generation goes to",
        'llama-server as it is only when it should be over within 0.5 s; anything longer is streamed and assembled.',
    ]
    text = '\n'.join(lines) + '\n'
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == '__main__':
    main()
