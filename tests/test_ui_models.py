"""The Models page lists real models from the library and loads/unloads a real llama-server."""

from __future__ import annotations

from pathlib import Path

from nicegui import app
from nicegui.testing import User

from tests.conftest import wait_for


async def test_models_page_lists_loads_and_unloads(models_env: Path, user: User) -> None:
    await user.open('/models')
    system = app.state.system
    await wait_for(lambda: system.library.get('tiny-llama'))
    await user.open('/models')
    await user.should_see(marker='model-tiny-llama')
    await user.should_see('llama')  # architecture read from the GGUF
    await user.should_see(marker='fit-tiny-llama')
    user.find(marker='load-tiny-llama').click()
    await wait_for(lambda: system.scheduler.describe('tiny-llama')['status'] == 'ready', deadline_s=60)
    await user.should_see('ready', retries=30)
    await user.should_see(marker='unload-tiny-llama', retries=30)
    user.find(marker='unload-tiny-llama').click()
    await wait_for(lambda: system.scheduler.describe('tiny-llama')['status'] == 'stopped', deadline_s=30)
    await user.should_see(marker='load-tiny-llama', retries=30)
