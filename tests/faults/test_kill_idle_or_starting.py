"""The real llama-server killed with `kill -9` while idle and while still starting (issue 14's fault suite; under
streams: test_kill_under_streams.py): the client gets a whole answer or an OpenAI-shaped error within its deadline,
the model comes back on its own, and the activity log has each request with the status the client saw."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from core.events import Event
from core.supervisor import ModelState
from tests.conftest import wait_for

CHAT = {'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}
DEADLINE_S = 30


async def _rows(served: Any, n: int) -> list[dict[str, Any]]:
    activity = served.system.proxy.activity
    return await wait_for(lambda: len(activity.recent(limit=20)) >= n and activity.recent(limit=20))


async def test_killed_while_idle(make_served: Any) -> None:
    async with await make_served() as served, served.client() as client:
        assert (await client.post('/v1/chat/completions', json=CHAT)).status_code == 200
        pid = served.upstream('tiny-llama').pid
        os.kill(pid, signal.SIGKILL)  # between requests: nobody is waiting on it
        r = await asyncio.wait_for(client.post('/v1/chat/completions', json=CHAT), DEADLINE_S)
        assert r.status_code == 200, r.text  # sent again to the server that replaces it, or waited for it
        assert r.json()['choices'][0]['message']['content'] is not None
        s = served.system.scheduler
        await wait_for(lambda: s.describe('tiny-llama')['status'] == ModelState.READY, DEADLINE_S)
        assert s.describe('tiny-llama')['pid'] != pid and s.describe('tiny-llama')['restarts'] == 1
        rows = await _rows(served, 2)
        assert [row['status'] for row in rows[:2]] == [200, 200]


async def test_killed_while_starting(make_served: Any) -> None:
    async with await make_served() as served, served.client() as client:
        system = served.system
        killed: list[int] = []

        def kill_on_first_line(e: Event) -> None:  # on the loop, at a line of its output while it still loads
            d = system.scheduler.describe('tiny-llama')
            if not killed and e.data.get('model') == 'tiny-llama' and d['pid'] and d['status'] == ModelState.STARTING:
                killed.append(d['pid'])
                os.kill(d['pid'], signal.SIGKILL)

        sub = system.bus.subscribe(['logs'], kill_on_first_line)
        # The tiny model is ready ~30 ms after spawn and its output is read in batches: a start may be over before
        # a line is seen. Then unload and start again, until one is killed while loading.
        for _ in range(10):
            r = await asyncio.wait_for(client.post('/v1/chat/completions', json=CHAT), DEADLINE_S)
            if killed:
                break
            await system.scheduler.unload('tiny-llama')
        sub.close()
        assert killed
        if r.status_code == 200:  # the supervisor's restart was ready before the request gave up on the first
            assert r.json()['choices']
        else:
            error = r.json()['error']
            assert r.status_code in (502, 503) and 'exited' in error['message'], r.text
        s = system.scheduler
        await wait_for(lambda: s.describe('tiny-llama')['status'] == ModelState.READY, DEADLINE_S)  # it comes back
        assert s.describe('tiny-llama')['pid'] != killed[0]
        assert (await client.post('/v1/chat/completions', json=CHAT)).status_code == 200
        rows = await _rows(served, 2)
        assert [row['status'] for row in rows[:2]] == [200, r.status_code]
