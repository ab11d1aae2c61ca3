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
    for label in ('Dashboard', 'Models', 'Get models', 'Monitoring', 'Logs', 'Settings', 'Chat'):
        await page.get_by_role('link', name=label, exact=True).wait_for()
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


ARTIFACTS = Path(__file__).parent / 'artifacts'


async def test_with_keys_a_browser_signs_in_once_and_lands_where_it_was_going(
    tmp_path: Path, models_dir: Path, tiny_model: Path, page
) -> None:
    from tests.conftest import start_app, stop_process

    app = start_app(tmp_path, '--models-dir', str(models_dir), env={'LAP_API_KEYS': 'browser-key'})
    errors: list[str] = []
    page.on('console', lambda m: errors.append(m.text) if m.type == 'error' else None)
    try:
        await page.goto(app.base_url + '/settings')
        assert page.url.endswith('/login?next=/settings')  # redirected before the page was built
        await page.get_by_label('API key').fill('wrong')
        await page.get_by_role('button', name='Sign in').click()
        await page.get_by_text('not one of the configured api_keys').wait_for()
        await page.get_by_label('API key').fill('browser-key')
        await page.get_by_role('button', name='Sign in').click()
        await page.wait_for_url(app.base_url + '/settings')
        binary = page.get_by_label('llama_server_path')
        await binary.wait_for()
        assert await binary.get_attribute('readonly') is not None  # set in the config file, env or CLI only
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / 'settings-after-login.png'), full_page=True)
        await page.goto(app.base_url + '/models')  # the browser stays signed in
        await page.get_by_text(tiny_model.stem).first.wait_for()
        await page.set_viewport_size({'width': 390, 'height': 844})
        await page.goto(app.base_url + '/login?next=//evil.example')
        await page.screenshot(path=str(ARTIFACTS / 'login-390.png'))
        assert not errors, errors
        storage = app.data_dir / 'browser-storage'  # the login's key digest: the user's alone, not ./.nicegui
        assert storage.is_dir() and storage.stat().st_mode & 0o077 == 0 and not (tmp_path / '.nicegui').exists()
        assert app.data_dir.stat().st_mode & 0o077 == 0
    finally:
        stop_process(app.proc, timeout=20)
    logs = list((app.data_dir / 'logs').glob('*.log'))
    assert logs and not any('Traceback' in p.read_text() for p in logs)
