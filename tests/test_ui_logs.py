"""The Logs page: lines with time, level colour and source apart from the model; pause and follow; clear; download;
a capped view that stays fast with 10 000 lines."""

from __future__ import annotations

import re

from nicegui import app, ui
from nicegui.testing import User

from tests.conftest import wait_for


def shown(user: User) -> list[ui.label]:
    view = user.find(marker='log-view').elements.pop()
    return list(view.default_slot.children)  # type: ignore[arg-type]


async def test_lines_show_time_level_source_and_model_coloured_by_level(user: User) -> None:
    await user.open('/logs')
    logs = app.state.system.logs
    logs.add('llama-server', 'slot 0 is busy', 'warning', model='m1')
    logs.add('llama-server', 'it broke', 'error', model='m1')
    await wait_for(lambda: any('it broke' in e.text for e in shown(user)))
    lines = {e.text.split('] ', 1)[-1]: e for e in shown(user) if '[llama-server · m1]' in e.text}
    assert set(lines) >= {'slot 0 is busy', 'it broke'}
    assert re.match(r'\d\d:\d\d:\d\d\.\d{3} ERROR +\[llama-server · m1\] it broke$', lines['it broke'].text)
    assert 'text-red-600' in lines['it broke'].classes and 'text-amber-600' in lines['slot 0 is busy'].classes


async def test_pause_holds_new_lines_until_follow_and_clear_empties_the_view(user: User) -> None:
    await user.open('/logs')
    logs = app.state.system.logs
    user.find(marker='log-follow').elements.pop().set_value(False)
    logs.add('app', 'held back while paused', 'warning')
    await user.should_see('new lines waiting', retries=30)
    assert not any('held back while paused' in e.text for e in shown(user))
    user.find(marker='log-follow').elements.pop().set_value(True)
    await wait_for(lambda: any('held back while paused' in e.text for e in shown(user)))
    user.find(marker='log-clear').click()
    await wait_for(lambda: not shown(user))
    logs.add('app', 'after the clear', 'warning')
    await wait_for(lambda: [e.text for e in shown(user)] and 'after the clear' in shown(user)[-1].text)


async def test_ten_thousand_lines_keep_the_view_capped(user: User) -> None:
    from ui.components.log_view import MAX_LINES

    await user.open('/logs')
    logs = app.state.system.logs
    for i in range(10_000):
        logs.add('app', f'line {i}', 'warning')
    await wait_for(lambda: shown(user) and shown(user)[-1].text.endswith('line 9999'), deadline_s=20)
    assert len(shown(user)) <= MAX_LINES


async def test_download_has_the_file(user: User) -> None:
    import logging

    await user.open('/logs')
    logging.getLogger('test').warning('a line to download')
    user.find(marker='log-download-app').click()
    await wait_for(lambda: user.download.http_responses, deadline_s=10)
    assert b'a line to download' in user.download.http_responses[-1].content
