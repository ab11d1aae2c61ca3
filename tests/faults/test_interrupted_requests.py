"""A request in flight when the app is killed is in the activity log after the restart, as interrupted (issue 14,
item 6): its row is written when it starts and completed when it ends, and the next start marks the rows an earlier
process left unfinished. The app is killed for real (SIGKILL to its process group) and started again on its data
dir, which it finds as it was: the config file unchanged, SQLite intact, no llama-server of the killed app left
running. The recorder's ordering and the marking are also checked on a System."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core.proxy.activity import INTERRUPTED, INTERRUPTED_ERROR, Activity, is_failure
from tests.conftest import SLOW_MODEL, AppProcess, poll, start_app, stop_process
from ui.activity import history_row
from ui.dashboard import request_row

CHAT = '/v1/chat/completions'


def rows_in_file(app: AppProcess) -> dict[str, sqlite3.Row]:
    """The app's request rows as SQLite holds them now (read from this process: WAL lets a reader in)."""
    conn = sqlite3.connect(f'file:{app.data_dir / "lap.sqlite3"}?mode=ro', uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return {r['id']: r for r in conn.execute('SELECT * FROM proxy_requests')}
    except sqlite3.OperationalError:  # the table is not there yet
        return {}
    finally:
        conn.close()


@contextlib.contextmanager
def app_on(tmp_path: Path, models: Path) -> Iterator[AppProcess]:
    app = start_app(tmp_path, '--models-dir', str(models))
    try:
        yield app
    finally:
        with contextlib.suppress(ProcessLookupError):
            if app.proc.poll() is None:
                os.killpg(app.proc.pid, signal.SIGTERM)
        stop_process(app.proc, timeout=20)


@pytest.mark.slow
def test_a_request_in_flight_when_the_app_is_killed_is_shown_interrupted(tmp_path: Path, slow_models: Path) -> None:
    with app_on(tmp_path, slow_models) as app:
        done = httpx.post(
            f'{app.base_url}{CHAT}',
            json={'model': SLOW_MODEL, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4},
            timeout=120,
        )
        assert done.status_code == 200, done.text
        long = {
            'model': SLOW_MODEL,
            'messages': [{'role': 'user', 'content': 'hi'}],
            'max_tokens': 4000,
            'ignore_eos': True,
            'stream': True,
        }
        with httpx.Client(timeout=60) as client, contextlib.ExitStack() as stack:
            r = stack.enter_context(client.stream('POST', f'{app.base_url}{CHAT}', json=long))
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any('"content":"' in line for line in lines), 'no token came'  # surely generating now
            inflight = httpx.get(f'{app.base_url}/api/requests/inflight').json()['requests']
            assert [x['model'] for x in inflight] == [SLOW_MODEL]
            cut = inflight[0]['id']
            # Both rows on disk (the flusher's interval is 0.5 s): the finished one, and the start of the long one.
            on_disk = poll(
                lambda: (
                    (rows := rows_in_file(app))
                    and cut in rows
                    and any(row['status'] == 200 for row in rows.values())
                    and rows
                ),
                10,
                'the rows were not flushed',
            )
            assert on_disk[cut]['status'] is None and on_disk[cut]['model'] == SLOW_MODEL
            finished_id = next(i for i, row in on_disk.items() if row['status'] == 200)
            put = httpx.put(f'{app.base_url}/api/config', json={'sse_heartbeat': 20}, timeout=30)
            assert put.status_code == 200, put.text
            config_before = app.config_path.read_bytes()
            servers = [p for p in psutil.Process(app.proc.pid).children(recursive=True) if p.name() == 'llama-server']
            assert len(servers) == 1
            os.killpg(app.proc.pid, signal.SIGKILL)
            app.proc.wait(10)
            # The kernel's parent-death signal ends its llama-server with it (before any restart reaps it).
            poll(lambda: not any(map(_running, servers)), 10, 'the llama-server outlived the app')
            stack.pop_all()  # the stream's connection died with the app: nothing to close politely
            with contextlib.suppress(httpx.HTTPError):
                r.close()

    with app_on(tmp_path, slow_models) as again:
        assert again.data_dir == app.data_dir
        assert again.config_path.read_bytes() == config_before  # the config file is as it was
        assert httpx.get(f'{again.base_url}/api/config').json()['settings']['sse_heartbeat'] == 20
        with contextlib.closing(sqlite3.connect(again.data_dir / 'lap.sqlite3')) as db:
            assert db.execute('PRAGMA integrity_check').fetchall() == [('ok',)]
        body = httpx.get(f'{again.base_url}/api/requests').json()
        rows = {row['id']: row for row in body['requests']}
        assert set(rows) == {cut, finished_id}
        interrupted = rows[cut]
        assert interrupted['status'] == INTERRUPTED and interrupted['error'] == INTERRUPTED_ERROR
        assert interrupted['model'] == SLOW_MODEL and interrupted['route'] == CHAT and interrupted['stream'] is True
        assert interrupted['duration_s'] is None
        assert is_failure(interrupted['status'])
        intact = rows[finished_id]
        assert intact['status'] == 200 and intact['error'] is None and intact['model'] == SLOW_MODEL
        assert intact['completion_tokens'] and intact['duration_s'] is not None
        errors = httpx.get(f'{again.base_url}/api/requests', params={'status': 'error'}).json()['requests']
        assert [row['id'] for row in errors] == [cut]
        ok = httpx.get(f'{again.base_url}/api/requests', params={'status': 'ok'}).json()['requests']
        assert [row['id'] for row in ok] == [finished_id]
        assert httpx.get(f'{again.base_url}/api/requests/inflight').json()['requests'] == []
        # How the pages show it.
        assert history_row(interrupted)['status'] == 'interrupted' and history_row(interrupted)['failed']
        assert request_row(interrupted)['status'] == 'interrupted' and request_row(interrupted)['failed']


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- the recorder on a System ----------------------------------------------------------------------------
def stored(activity: Activity) -> dict[str, sqlite3.Row]:
    activity.flush()
    return {r['id']: r for r in activity.store.query('SELECT * FROM proxy_requests')}


async def test_a_start_row_is_replaced_by_its_finish(system_factory: Callable[..., Any]) -> None:
    system = await system_factory()
    activity: Activity = system.proxy.activity
    # Flushed in between: the start's row is on disk, in flight (status NULL), and no read shows it as history.
    rec = activity.begin('127.0.0.1', CHAT, 'POST')
    rec.model, rec.stream = 'm', True
    activity.announce(rec)
    row = stored(activity)[rec.id]
    assert row['status'] is None and row['model'] == 'm' and row['route'] == CHAT and row['duration_s'] is None
    assert activity.query()[1] == 0 and activity.facets()['model'] == []
    assert activity.export('json') == b'[]'
    rec.status, rec.completion_tokens, rec.error = 404, 3, 'nope'
    activity.finish(rec)
    row = stored(activity)[rec.id]
    assert (row['status'], row['completion_tokens'], row['error']) == (404, 3, 'nope')
    assert row['duration_s'] is not None
    # Within one flush interval: started and finished, written once, finished.
    quick = activity.begin('127.0.0.1', CHAT, 'POST')
    quick.model = 'm'
    activity.announce(quick)
    quick.status = 200
    activity.finish(quick)
    assert len(activity._pending) == 2  # its start and its finish
    assert stored(activity)[quick.id]['status'] == 200
    # A start read while its figures are being filled in is still in flight: its status is written NULL.
    busy = activity.begin('127.0.0.1', CHAT, 'POST')
    activity.announce(busy)
    busy.status = 200  # set by the relay a moment before `finish`
    assert stored(activity)[busy.id]['status'] is None
    activity.finish(busy)
    rows, total = activity.query()
    assert total == 3 and [r['id'] for r in rows] == [busy.id, quick.id, rec.id]
    assert {r['status'] for r in rows} == {200, 404}
    assert activity.stats()['requests_total'] == 3


async def test_only_an_earlier_process_rows_are_marked_interrupted(system_factory: Callable[..., Any]) -> None:
    system = await system_factory()
    activity: Activity = system.proxy.activity
    # An earlier recorder (another id prefix) that died with one request in flight and one finished.
    earlier = Activity(system.store, system.bus, lambda: 1000)
    assert earlier._prefix != activity._prefix
    cut = earlier.begin('10.0.0.1', CHAT, 'POST')
    cut.model = 'gone'
    earlier.announce(cut)
    ended = earlier.begin('10.0.0.1', CHAT, 'POST')
    ended.model, ended.status = 'gone', 200
    earlier.announce(ended)
    earlier.finish(ended)
    earlier.flush()
    # This process: one request in flight, its start row on disk.
    mine = activity.begin('127.0.0.1', CHAT, 'POST')
    mine.model = 'here'
    activity.announce(mine)
    activity.flush()

    assert activity.mark_interrupted() == 1
    rows = stored(activity)
    assert (rows[cut.id]['status'], rows[cut.id]['error']) == (INTERRUPTED, INTERRUPTED_ERROR)
    assert rows[cut.id]['model'] == 'gone' and rows[cut.id]['route'] == CHAT
    assert rows[ended.id]['status'] == 200 and rows[ended.id]['error'] is None
    assert rows[mine.id]['status'] is None  # still in flight here: not touched
    assert activity.mark_interrupted() == 0
    assert [r['id'] for r in activity.query(status='error')[0]] == [cut.id]
    assert [r['id'] for r in activity.query(status='ok')[0]] == [ended.id]
    assert [r['id'] for r in activity.query(status=str(INTERRUPTED))[0]] == [cut.id]
    assert INTERRUPTED in activity.facets()['status'] and 'here' not in activity.facets()['model']
    activity.finish(mine)  # no status set: recorded as 500 (mine is a this-process row, never marked)
    assert stored(activity)[mine.id]['status'] == 500

    # The next recorder (as the next run builds it) marks what is left in flight as soon as it is built.
    left = activity.begin('127.0.0.1', CHAT, 'POST')
    left.model = 'here'
    activity.announce(left)
    activity.flush()
    later = Activity(system.store, system.bus, lambda: 1000)
    assert [r['id'] for r in later.query(status='error')[0]] == [left.id, mine.id, cut.id]  # mine: a 500
    await later.start()
    try:
        latest = {r['id']: r for r in later.latest()}
        assert latest[left.id]['status'] == INTERRUPTED and latest[cut.id]['status'] == INTERRUPTED
        assert history_row(latest[left.id])['status'] == 'interrupted'
    finally:
        await later.stop()
    activity.finish(left)  # the late finish of a row marked meanwhile: its real outcome wins
    assert stored(activity)[left.id]['status'] == 500
