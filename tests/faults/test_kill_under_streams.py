"""llama-server killed with `kill -9` under 8 concurrent streams (issue 14's fault suite): every client ends within
its deadline with a well-formed error (an `error` event in its stream, or a 502 with an OpenAI-shaped body for one
still queued; never `[DONE]` after a cut, never a hang). A request that had no answer yet (queued in llama-server,
or sent right after) is resent to the server that replaces the dead one and answered whole; the activity log
records each cut one as the failure it was."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SLOW_MODEL, wait_for
from tests.proxy_helpers import Served, serve

STREAMS = 8
DEADLINE_S = 60  # per stream; an uncut stream of this length would take far longer on the slow model


@pytest.fixture
async def served(system_factory: Any, slow_models: Path) -> Any:
    params = {SLOW_MODEL: {'ctx_size': 16384, 'parallel': 4, 'threads': 1, 'extra_args': ['--threads-http', '12']}}
    system = await system_factory(models_dirs=[slow_models], scan_well_known_dirs=False, models=params)
    async with serve(system) as s:
        yield s


async def test_kill_9_under_eight_streams(served: Served) -> None:
    body = {
        'model': SLOW_MODEL,
        'messages': [{'role': 'user', 'content': 'tell me everything'}],
        'max_tokens': 600,  # long enough to be cut; short enough for a retried one to finish quickly
        'stream': True,
        'ignore_eos': True,
    }
    generating: set[int] = set()
    four_generating = asyncio.Event()
    generating_at_kill: set[int] = set()  # streams whose tokens were on the way when the server died
    finished: set[int] = set()

    async def stream(i: int) -> list[str]:
        lines: list[str] = []
        async with served.client() as c, c.stream('POST', '/v1/chat/completions', json=body) as r:
            if r.status_code != 200:  # still queued in llama-server when it died: no stream had begun
                error = json.loads(await r.aread())['error']
                assert r.status_code == 502 and error['message'], error  # an OpenAI-shaped error, with a reason
                return ['event: error', 'data: ' + json.dumps({'error': error})]
            async for line in r.aiter_lines():
                if line == 'data: [DONE]':
                    finished.add(i)
                lines.append(line)
                if '"content":"' in line and i not in generating:
                    generating.add(i)
                    if len(generating) == 4:
                        four_generating.set()
        return [ln for ln in lines if ln]

    tasks = [asyncio.create_task(asyncio.wait_for(stream(i), DEADLINE_S)) for i in range(STREAMS)]
    # Four generate at once (4 slots); the other four wait in llama-server's queue: cut them all the same.
    await asyncio.wait_for(four_generating.wait(), DEADLINE_S)  # whichever four got the slots
    pid = next(u.pid for u in served.system.scheduler.running() if u.model_id == SLOW_MODEL)
    generating_at_kill.update(generating - finished)
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cut = 0
    for i, lines in enumerate(results):
        assert not isinstance(lines, BaseException), f'stream {i}: {lines!r}'  # none hung past its deadline
        if i in generating_at_kill:  # its tokens were on their way to the client: it can only end with an error
            assert 'data: [DONE]' not in lines, f'stream {i} claimed to be complete'
        if lines[-1] == 'data: [DONE]':  # done before the kill, or queued and resent to the new server: whole
            assert '"finish_reason":"length"' in lines[-2], f'stream {i}: {lines[-3:]}'
            continue
        assert lines[-2] == 'event: error' and lines[-1].startswith('data: {"error"'), f'stream {i}: {lines[-3:]}'
        cut += 1
    assert cut == len(generating_at_kill) >= 1
    # A request sent at once is not the one that fails: it waits for the server that replaces the dead one.
    async with served.client() as c:
        r = await c.post(
            '/v1/chat/completions',
            json={'model': SLOW_MODEL, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4},
        )
    assert r.status_code == 200, r.text
    assert served.system.scheduler.describe(SLOW_MODEL)['pid'] not in (None, pid)
    # Each cut request is in the history as a failure, with the reason.
    activity = served.system.proxy.activity
    rows = await wait_for(lambda: len(activity.recent(limit=20)) >= STREAMS + 1 and activity.recent(limit=20))
    failed = [r for r in rows if r['status'] != 200]
    assert len(failed) == cut and all(r['status'] >= 500 and r['error'] for r in failed), failed
