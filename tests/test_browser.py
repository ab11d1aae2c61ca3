"""A few checks in a real Chromium (system package) against the app started through its real CLI."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import AppProcess

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
ARGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
]


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    assert Path(CHROMIUM).exists(), 'Chromium is needed for browser checks: apt-get install chromium (make test does)'
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={'width': 1280, 'height': 900})
        yield page
        await browser.close()


async def test_dashboard_renders_live_numbers(app_process: AppProcess, page, tmp_path: Path) -> None:
    await page.goto(app_process.base_url + '/')
    for label in ('Dashboard', 'Models', 'Monitoring', 'Logs', 'Settings', 'Chat'):
        await page.get_by_role('link', name=label).wait_for()
    cpu = page.get_by_text('%', exact=False).first
    await cpu.wait_for(timeout=15000)  # a real sample arrived over NiceGUI's websocket
    await page.screenshot(path=str(tmp_path / 'dashboard.png'), full_page=True)
    assert (tmp_path / 'dashboard.png').stat().st_size > 10_000


async def test_chat_streams_a_reply_in_the_browser(app_process: AppProcess, page, tmp_path: Path) -> None:
    await page.goto(app_process.base_url + '/chat')
    await page.get_by_placeholder('Message').fill('Tell me about the water')
    await page.get_by_role('button', name='Send').click()
    await page.get_by_text('completion tokens').wait_for(timeout=60000)
    reply = await page.locator('.q-message-text').last.inner_text()
    assert reply.strip() and 'Error' not in reply
    await page.screenshot(path=str(tmp_path / 'chat.png'))
    await page.goto(app_process.base_url + '/models')
    await page.get_by_text('ready').first.wait_for(timeout=15000)  # started on demand by the chat
