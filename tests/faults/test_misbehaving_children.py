"""Children that misbehave on purpose (the scripted `tests/fake_llama_server.py`): a crash loop, a grandchild that
keeps the output pipes open, a 10 MB line. Stops complete within their timeouts, the output reader survives and
its memory stays bounded, and a crash loop backs off with growing pauses, idle, before it ends `failed`."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.supervisor import ModelState, StartFailed
from core.supervisor.process import MAX_LINE
from tests.conftest import wait_for
from tests.supervisor_helpers import alive, fake_binary


async def test_a_crash_loop_backs_off_longer_each_time_idle_and_ends_failed(
    harness: Any, tiny_model: Path, tmp_path: Path
) -> None:
    h = await harness(
        {'tiny': tiny_model}, llama_server_path=fake_binary(tmp_path, FAKE_EXIT='3'), restart_backoff=0.25
    )
    marks: list[tuple[str, float, float]] = []  # (state, wall clock, this process's CPU time)
    h.bus.subscribe(['models'], lambda e: marks.append((e.data['state'], time.monotonic(), time.process_time())))
    with pytest.raises(StartFailed) as first:
        await h.scheduler.load('tiny')
    assert 'exited with code 3' in first.value.message and 'fake failure' in first.value.message
    await wait_for(lambda: h.scheduler.describe('tiny')['status'] == ModelState.FAILED, 30)

    pauses = [  # from each `restarting` to the next `starting`
        (marks[i + 1][1] - t, marks[i + 1][2] - cpu)
        for i, (state, t, cpu) in enumerate(marks[:-1])
        if state == ModelState.RESTARTING and marks[i + 1][0] == ModelState.STARTING
    ]
    walls = [wall for wall, _ in pauses]
    assert len(pauses) == 4, marks  # 5 failures in the window, then it gives up
    assert all(b > a * 1.5 for a, b in itertools.pairwise(walls)), walls  # 0.25, 0.5, 1, 2 s (+jitter)
    assert walls[0] >= 0.25 and walls[-1] >= 2.0, walls
    longest_wall, longest_cpu = pauses[-1]
    assert longest_cpu < 0.1 * longest_wall, pauses  # nothing spins while it waits (the loop is this process)

    failed = h.scheduler.describe('tiny')
    assert 'giving up' in failed['error'] and failed['pid'] is None
    tail = next(e for e in reversed(h.events) if e.data.get('state') == ModelState.FAILED).data['log_tail']
    assert any('fake failure' in line for line in tail)  # the last lines say why
    assert not psutil.Process().children(recursive=True)  # no child left behind by any attempt


@pytest.fixture
def grandchild_pid_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / 'grandchild.pid'
    yield path
    if path.exists():  # it runs in a session of its own: nobody else will kill it
        pid = int(path.read_text())
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_grandchild_holding_the_pipes_does_not_hold_up_a_stop(
    harness: Any, tiny_model: Path, tmp_path: Path, grandchild_pid_file: Path
) -> None:
    binary = fake_binary(tmp_path, FAKE_GRANDCHILD=str(grandchild_pid_file))
    h = await harness({'tiny': tiny_model}, llama_server_path=binary, stop_timeout=3)
    fds = psutil.Process().num_fds()
    up = await h.scheduler.load('tiny')
    grandchild = int(await wait_for(lambda: grandchild_pid_file.exists() and grandchild_pid_file.read_text(), 10))
    started = time.monotonic()
    await h.scheduler.unload('tiny')
    assert time.monotonic() - started < 3 + 2  # stop_timeout and the 1 s wait for the pipes' end, with a margin
    assert not alive(up.pid) and alive(grandchild)  # the pipes are still open: the reader was not waited out
    assert h.scheduler.describe('tiny')['status'] == ModelState.STOPPED
    assert psutil.Process().num_fds() <= fds  # our ends of its pipes are closed all the same

    again = await h.scheduler.load('tiny')  # and the next server's output is read as before
    assert again.pid != up.pid
    await wait_for(lambda: any(f':{again.port}' in r.message for r in h.logs.query(model='tiny')), 10)


async def test_a_10_mb_line_is_cut_and_reading_goes_on(harness: Any, tiny_model: Path, tmp_path: Path) -> None:
    before = psutil.Process().memory_info().rss
    h = await harness({'tiny': tiny_model}, llama_server_path=fake_binary(tmp_path, FAKE_LONG_LINE=str(10_000_000)))
    up = await h.scheduler.load('tiny')

    def lines() -> list[Any]:
        return h.logs.query(model='tiny', source='llama-server', limit=10_000)

    await wait_for(lambda: any('listening' in r.message for r in lines()), 10)  # the line after it is read
    long = [r.message for r in lines() if r.message.startswith('xxx')]
    assert len(long) == 1 and len(long[0]) < MAX_LINE + 100 and long[0].endswith('[... line cut at 16 KiB]')
    assert psutil.Process().memory_info().rss - before < 50 * 2**20  # not the 10 MB (and copies) of a whole line
    started = time.monotonic()
    await h.scheduler.unload('tiny')
    assert time.monotonic() - started < 5 and not alive(up.pid)


async def test_a_stop_that_finds_a_task_running_is_not_turned_into_a_hang(
    harness: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """Found by the soak: the first SIGTERM found a task still running (its client gone), the second one sent
    1 s later made llama-server "terminate immediately", and its exit hung until the SIGKILL 10 s on. Now that
    exit gets 1 s; the stop takes about 2 s, not stop_timeout."""
    binary = fake_binary(tmp_path, FAKE_TERM_AFTER='30')  # its task would run 30 s more
    h = await harness({'tiny': tiny_model}, llama_server_path=binary, stop_timeout=10)
    up = await h.scheduler.load('tiny')
    started = time.monotonic()
    await h.scheduler.unload('tiny')
    took = time.monotonic() - started
    assert 1.9 < took < 4, took  # resend at 1 s, "terminating immediately", killed 1 s after it
    assert not alive(up.pid)
    lines = [r.message for r in h.logs.query(model='tiny', source='llama-server')]
    assert any('terminating immediately' in line for line in lines)


async def test_a_sigterm_lost_at_start_up_is_sent_again(harness: Any, tiny_model: Path, tmp_path: Path) -> None:
    """The other case the second SIGTERM is for: the first said it was cleaning up and was lost; the second is
    honoured (here: the child exits 0.2 s after it), well before stop_timeout."""
    binary = fake_binary(tmp_path, FAKE_TERM_AFTER='30', FAKE_TERM_SECOND_EXITS='1')
    h = await harness({'tiny': tiny_model}, llama_server_path=binary, stop_timeout=10)
    up = await h.scheduler.load('tiny')
    started = time.monotonic()
    await h.scheduler.unload('tiny')
    assert time.monotonic() - started < 3 and not alive(up.pid)


async def test_an_exit_that_hangs_after_a_second_sigterm_is_killed_soon(
    harness: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """A build that does not say it heard the first SIGTERM gets the second one; if that exit hangs, a SIGKILL
    follows a second later, not at stop_timeout."""
    binary = fake_binary(tmp_path, FAKE_TERM_AFTER='30', FAKE_TERM_QUIET='1')
    h = await harness({'tiny': tiny_model}, llama_server_path=binary, stop_timeout=20)
    up = await h.scheduler.load('tiny')
    started = time.monotonic()
    await h.scheduler.unload('tiny')
    took = time.monotonic() - started
    assert took < 5, took  # resend at 1 s, "terminating immediately", killed 1 s after it
    assert not alive(up.pid)
