"""Pages through NiceGUI's simulated user (no browser): the frame, navigation and the settings form."""

from __future__ import annotations

from nicegui import ui
from nicegui.testing import User

PAGES = {
    '/': 'Dashboard',
    '/models': 'Models',
    '/downloads': 'Get models',
    '/activity': 'Activity',
    '/monitoring': 'Monitoring',
    '/nodes': 'Nodes',
    '/logs': 'Logs',
    '/settings': 'Settings',
    '/chat': 'Chat',
}


async def test_every_page_has_the_frame_and_navigation(user: User) -> None:
    for path, title in PAGES.items():
        await user.open(path)
        await user.should_see('Llama Async Proxy')
        await user.should_see(title)
        for label in PAGES.values():
            await user.should_see(label, kind=ui.label)
        await user.should_see(marker='binary-status')
    await user.should_see('llama-server 0.')  # the real binary's version, resolved at start


async def test_dashboard_shows_real_facts(user: User) -> None:
    await user.open('/')
    await user.should_see('llama-server')
    await user.should_see('Models found')
    await user.should_see('http://127.0.0.1:8080/v1')


async def test_navigation_links_open_pages(user: User) -> None:
    await user.open('/')
    user.find(marker='nav-settings').click()
    await user.should_see('Saved to')


async def test_logs_page_streams_new_lines(user: User) -> None:
    import logging

    await user.open('/logs')
    logging.getLogger('test').warning('a line for the logs page')
    await user.should_see('a line for the logs page', retries=20)


async def test_logs_page_filters_by_level_and_text(user: User) -> None:
    from nicegui import app

    await user.open('/logs')
    logs = app.state.system.logs
    view = user.find(marker='log-view').elements.pop()
    user.find(marker='log-level').elements.pop().set_value('error')
    logs.add('llama-server', 'quiet warning line', 'warning', model='m1')
    logs.add('llama-server', 'loud error line', 'error', model='m1')
    await user.should_see('loud error line', retries=20)
    await user.should_not_see('quiet warning line')
    user.find(marker='log-level').elements.pop().set_value('debug')
    user.find(marker='log-search').type('quiet')
    await user.should_see('quiet warning line', retries=20)  # reloaded from the ring buffer with the new filters
    await user.should_not_see('loud error line')
    assert view is user.find(marker='log-view').elements.pop()
