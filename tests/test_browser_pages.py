"""Every page in a real Chromium against the app started through its real CLI: light, dark and phone width with
no console errors; live updates through a network cut; Load with progress; a parameter change that restarts the
running model; a screenshot of each (tests/artifacts/, ignored). The app log is checked for `ui/` tracebacks."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AppProcess, free_port, poll, start_app, stop_process
from tests.gguf_factory import write_tiny_gguf
from tests.test_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).parent / 'artifacts'
PAGES = {
    'dashboard': ('/', 'Dashboard'),
    'models': ('/models', 'Models'),
    'downloads': ('/downloads', 'Get models'),
    'activity': ('/activity', 'Activity'),
    'monitoring': ('/monitoring', 'Monitoring'),
    'nodes': ('/nodes', 'Nodes'),
    'logs': ('/logs', 'Logs'),
    'chat': ('/chat', 'Chat'),
    'settings': ('/settings', 'Settings'),
}
OFFLINE = {'offline': True, 'latency': 0, 'downloadThroughput': -1, 'uploadThroughput': -1}
ONLINE = {**OFFLINE, 'offline': False}
# While the network is cut the browser itself reports the failed socket and fetches; nothing else may appear.
NETWORK_CUT = re.compile(r'ERR_INTERNET_DISCONNECTED|WebSocket connection to .* failed')


@pytest.fixture(scope='module')
def shop(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[AppProcess]:
    """One app for the module: a tiny model, a bigger one (its load takes long enough to be seen), a corrupt file."""
    tmp = tmp_path_factory.mktemp('browser-app')
    models = tmp / 'models'
    models.mkdir()
    shutil.copy(tiny_model, models / 'tiny-llama.gguf')
    write_tiny_gguf(models / 'wide-llama.gguf', name='wide-llama', seed=7, n_embd=384, n_ff=1536, n_layer=4)
    (models / 'broken.gguf').write_bytes(b'GGUF\x03\x00\x00\x00' + b'\xff' * 24)
    # A node that is not there: the Nodes page shows how a down machine looks.
    away = [{'name': 'gpu-box', 'kind': 'node', 'url': f'http://127.0.0.1:{free_port()}', 'api_key': 'k'}]
    env = {'LAP_METRICS_INTERVAL': '0.5', 'LAP_REMOTES': json.dumps(away)}
    app = start_app(tmp, '--models-dir', str(models), env=env)
    yield app
    stop_process(app.proc, timeout=30)
    log = (app.data_dir / 'logs' / 'app.log').read_text()
    assert not re.search(r'File ".*/ui/', log), 'a ui/ traceback in the app log'
    assert not re.search(r' ERROR .*(javascript|Plotly|console)', log, re.I), 'a browser error logged at ERROR'


class Console:
    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on('console', lambda m: self.errors.append(m.text) if m.type == 'error' else None)
        page.on('pageerror', lambda e: self.errors.append(f'page error: {e}'))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not NETWORK_CUT.search(e)]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


async def new_page(browser: Any, width: int = 1440, height: int = 900, scheme: str = 'light') -> tuple[Any, Console]:
    context = await browser.new_context(viewport={'width': width, 'height': height}, color_scheme=scheme)
    page = await context.new_page()
    return page, Console(page)


def api(app: AppProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, app.base_url + path, timeout=60, **kw)


async def settle(page: Any) -> None:
    """The page is connected and drawn (NiceGUI's socket up, nothing loading)."""
    await page.wait_for_load_state('networkidle')
    await page.wait_for_function('window.socket && window.socket.connected')


async def test_theme_toggle_is_remembered_per_browser(shop: AppProcess, browser: Any) -> None:
    page, console = await new_page(browser, scheme='light')
    await page.goto(shop.base_url + '/models')
    await settle(page)
    toggle = page.locator('button[aria-label^="Theme"]')
    await toggle.click()  # auto -> light
    await page.wait_for_selector('button[aria-label="Theme: light"]')
    await toggle.click()  # light -> dark
    await page.wait_for_selector('body.body--dark')
    await page.goto(shop.base_url + '/logs')
    await settle(page)
    assert 'body--dark' in (await page.get_attribute('body', 'class') or '')  # remembered, though the system is light
    await page.locator('button[aria-label^="Theme"]').click()  # dark -> auto
    await page.wait_for_selector('body.body--light')
    assert not console.unexpected(), console.errors


async def test_live_updates_survive_a_network_cut(shop: AppProcess, browser: Any) -> None:
    api(shop, 'POST', '/api/models/unload')
    page, console = await new_page(browser)
    await page.goto(shop.base_url + '/')
    await settle(page)
    await page.evaluate('window.__same_page = true')
    cdp = await page.context.new_cdp_session(page)
    await cdp.send('Network.enable')
    await cdp.send('Network.emulateNetworkConditions', OFFLINE)
    banner = page.get_by_text('Connection lost, reconnecting')
    await banner.wait_for(state='visible', timeout=1500)
    time.sleep(1.2)  # the cut itself: what a flaky network does
    await cdp.send('Network.emulateNetworkConditions', ONLINE)
    await banner.wait_for(state='hidden', timeout=15000)
    # After the reconnect: a model loads, a request is served, a warning is logged; all of it shows up.
    assert api(shop, 'POST', '/api/models/tiny-llama/load').status_code == 200
    body = {'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}
    assert api(shop, 'POST', '/v1/chat/completions', json=body).status_code == 200
    assert api(shop, 'POST', '/v1/chat/completions', json={**body, 'model': 'no-such-model'}).status_code == 404
    loaded = page.locator('.q-card', has_text='Models loaded')
    await loaded.get_by_text(re.compile(r'^1 / 2$')).wait_for(timeout=10000)  # a KPI (the corrupt file not counted)
    await page.locator('.q-card', has_text='Loaded models').get_by_text('ready').wait_for(timeout=10000)  # a status
    await page.get_by_role('cell', name='404').wait_for(timeout=10000)  # the failed request in the table
    assert await page.evaluate('window.__same_page === true')  # no reload
    # The logs page too: a log line arrives after a cut.
    await page.goto(shop.base_url + '/logs')
    await settle(page)
    await page.evaluate('window.__same_page = true')
    await cdp.send('Network.emulateNetworkConditions', OFFLINE)
    await banner.wait_for(state='visible', timeout=1500)
    time.sleep(1.0)
    await cdp.send('Network.emulateNetworkConditions', ONLINE)
    await banner.wait_for(state='hidden', timeout=15000)
    assert api(shop, 'POST', '/api/models/tiny-llama/unload').status_code == 200
    await (
        page.locator('.nicegui-log')
        .get_by_text(re.compile('tiny-llama.*(stopp|terminat|exit)', re.I))
        .first.wait_for(timeout=10000)
    )
    assert await page.evaluate('window.__same_page === true')
    assert not console.unexpected(), console.errors


async def test_load_from_models_shows_progress_then_ready(shop: AppProcess, browser: Any) -> None:
    api(shop, 'POST', '/api/models/unload')
    page, console = await new_page(browser)
    # Record whether a progress bar was ever on the page: a load of a small model is quicker than any poll.
    await page.add_init_script(
        'new MutationObserver(() => { if (document.querySelector(".q-linear-progress")) window.__progress = true; })'
        '.observe(document, {subtree: true, childList: true});'
    )
    await page.goto(shop.base_url + '/models')
    await settle(page)
    card = page.locator('.q-card', has_text='wide-llama').first
    await card.get_by_role('button', name='Load').click()
    await page.get_by_text('Loading wide-llama').wait_for()
    await card.locator('.q-badge', has_text='ready').wait_for(timeout=60000)
    await page.get_by_text('wide-llama is ready').wait_for(timeout=10000)  # the toast, after the redraw
    assert await page.evaluate('window.__progress === true')
    await card.get_by_role('button', name='Unload').click()
    await card.locator('.q-badge', has_text='stopped').wait_for(timeout=30000)
    assert not console.unexpected(), console.errors


async def test_a_parameter_change_shows_in_the_command_line_and_restarts_the_model(
    shop: AppProcess, browser: Any
) -> None:
    assert api(shop, 'POST', '/api/models/tiny-llama/load').status_code == 200
    pid = api(shop, 'GET', '/api/models/tiny-llama').json()['pid']
    page, console = await new_page(browser)
    await page.goto(shop.base_url + '/models')
    await settle(page)
    card = page.locator('.q-card', has_text='tiny-llama').first
    await card.get_by_role('button', name='Details').click()
    dialog = page.locator('.q-dialog')
    await dialog.get_by_role('tab', name='Command line').click()
    command = dialog.locator('code', has_text='--model')
    await command.wait_for()
    assert '--ctx-size 768' not in await command.inner_text()
    await dialog.get_by_role('tab', name='Parameters').click()
    await dialog.get_by_label('Ctx size').fill('768')
    await dialog.get_by_role('button', name='Save parameters').click()
    await page.get_by_text('restarts with the new command line').wait_for(timeout=10000)
    await dialog.get_by_role('tab', name='Command line').click()
    await dialog.locator('code', has_text='--ctx-size 768').wait_for(timeout=10000)
    await page.screenshot(path=str(ARTIFACTS / 'model-details.png'))
    poll(lambda: (d := api(shop, 'GET', '/api/models/tiny-llama').json())['status'] == 'ready' and d['pid'] != pid, 60)
    # A refused value: its field says why, nothing is saved.
    await dialog.get_by_role('tab', name='Parameters').click()
    await dialog.get_by_label('Threads', exact=True).fill('0')
    await dialog.get_by_role('button', name='Save parameters').click()
    await dialog.get_by_text('greater than or equal to 1').wait_for(timeout=10000)
    assert 'threads' not in api(shop, 'GET', '/api/models/tiny-llama/parameters').json()['params']
    await dialog.get_by_role('button', name='Reset to defaults').click()
    poll(lambda: not api(shop, 'GET', '/api/models/tiny-llama/parameters').json()['params'], 20)
    assert not console.unexpected(), console.errors


async def test_chat_stop_ends_the_generation_and_the_transcript_survives_a_reload(
    shop: AppProcess, browser: Any
) -> None:
    page, console = await new_page(browser)
    await page.goto(shop.base_url + '/chat')
    await settle(page)
    await page.get_by_label('Model').click()
    await page.get_by_role('option', name=re.compile('^wide-llama')).click()
    await page.get_by_label('Max tokens').fill('4000')
    await page.get_by_placeholder('Message').fill('Tell me a long story')
    await page.get_by_placeholder('Message').press('Enter')  # Enter sends
    stop = page.get_by_role('button', name='Stop')
    await stop.wait_for(timeout=60000)
    await page.get_by_text(re.compile(r'TTFT .* tokens$')).wait_for(timeout=60000)  # live figures: it streams
    await stop.click()
    await page.get_by_text('Stopped', exact=True).wait_for(timeout=10000)
    # The proxy recorded the request as cancelled by the client, and the model's slot is free again.
    rows = poll(
        lambda: [r for r in api(shop, 'GET', '/api/requests?limit=5').json()['requests'] if r['status'] == 499], 20
    )
    assert rows[0]['model'] == 'wide-llama' and rows[0]['completion_tokens'] != 4000
    assert not api(shop, 'GET', '/api/requests/inflight').json()['requests']
    await page.reload()
    await settle(page)
    await page.get_by_text('Tell me a long story').wait_for(timeout=10000)  # the transcript is the tab's
    await page.screenshot(path=str(ARTIFACTS / 'chat-stopped.png'))
    assert not console.unexpected(), console.errors


async def test_a_bad_settings_value_shows_its_field_error_and_saves_nothing(shop: AppProcess, browser: Any) -> None:
    before = shop.config_path.read_text() if shop.config_path.exists() else None
    page, console = await new_page(browser, 390, 844)
    await page.goto(shop.base_url + '/settings')
    await settle(page)
    field = page.get_by_label('Concurrency limit')
    await field.fill('0')
    await page.get_by_role('button', name='Save').click()
    await page.get_by_text('Not saved').first.wait_for(timeout=10000)
    error = page.get_by_text('greater than or equal to 1').first
    await error.wait_for()
    assert await error.is_visible() and await field.is_visible()  # scrolled to, at phone width
    assert (shop.config_path.read_text() if shop.config_path.exists() else None) == before
    await page.screenshot(path=str(ARTIFACTS / 'settings-error-phone.png'))
    assert not console.unexpected(), console.errors


# Last: by now the history, the charts and the logs hold what the tests above did, as a user's would.
async def test_every_page_in_light_dark_and_phone_without_console_errors(shop: AppProcess, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for scheme, width, height, tag in (
        ('light', 1440, 900, 'light'),
        ('dark', 1440, 900, 'dark'),
        ('light', 390, 844, 'phone'),
    ):
        page, console = await new_page(browser, width, height, scheme)
        for name, (path, title) in PAGES.items():
            await page.goto(shop.base_url + path)
            await settle(page)
            assert await page.title() == f'{title} · Llama Async Proxy'
            body = await page.get_attribute('body', 'class') or ''
            assert f'body--{scheme}' in body  # the theme follows the system while set to auto
            nav = page.locator('.q-drawer a[aria-current=page]')
            if tag == 'phone':
                assert not await page.locator('.q-drawer').is_visible()  # the drawer starts closed on a phone
                width_px = await page.evaluate('document.documentElement.scrollWidth')
                assert width_px <= width + 1, f'{name} scrolls sideways at {width} px: {width_px}'
            else:
                assert (await nav.inner_text()).splitlines()[-1] == title  # after the icon's ligature name
            await page.screenshot(path=str(ARTIFACTS / f'{name}-{tag}.png'), full_page=True)
        assert not console.unexpected(), console.errors
        await page.context.close()
