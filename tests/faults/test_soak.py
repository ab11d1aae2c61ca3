"""The soak's 60-second variant (`bench/soak.py`, 30 minutes for the figures in docs/BENCHMARKS.md): mixed
traffic with swaps, disconnects, config changes and dashboard tabs open, through the real CLI; nothing the app
holds grows after the warm-up and no request gets a 5xx. And the figures it reads, on a System."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.test_browser import CHROMIUM


@pytest.mark.browser
def test_a_minute_of_mixed_traffic_leaves_nothing_growing(tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), 'Chromium is needed for the dashboard tabs: make test installs it'
    out = tmp_path / 'soak.json'
    argv = [sys.executable, 'bench/soak.py', '--seconds', '60', '--warmup', '30', '--sample', '5']
    run = subprocess.run(
        [*argv, '--check', '--no-write', '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.exists(), run.stdout + run.stderr
    result = json.loads(out.read_text())
    failed = [v for v in result['verdicts'] if not v['ok']]
    assert not failed and run.returncode == 0, (failed, result['server_errors'], run.stderr[-2000:])
    seen = {key for key, n in result['outcomes'].items() if n}
    for kind in ('chat 200', 'stream 200', 'stream_cut cut', 'plain_cut cut', 'embeddings 200'):
        assert kind in seen, result['outcomes']  # every kind of traffic ran
    assert {'config 200', 'params 200', 'unload 200'} <= seen, result['outcomes']  # and every change landed
    assert not result['console_errors']
    # It stopped on SIGTERM, gracefully: uvicorn re-raises the signal after its shutdown, hence -15.
    assert result['exit_code'] in (0, -signal.SIGTERM)


async def test_the_runtime_figures_are_the_process_own(make_served: Any) -> None:
    async with await make_served() as served, served.client() as client:
        before = (await client.get('/api/health/runtime')).json()
        assert before['children'] == 0 and before['asyncio_tasks'] > 0 and before['threads'] > 0
        chat = {'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 2}
        assert (await client.post('/v1/chat/completions', json=chat)).status_code == 200
        served.system.proxy.activity.flush()
        now = (await client.get('/api/health/runtime')).json()
    assert now['children'] == 1  # its llama-server
    assert now['disk_bytes']['sqlite'] > 0 and now['rss_bytes'] > 10 * 2**20
    assert now['open_fds'] > 0 and now['event_subscribers'] >= 1
