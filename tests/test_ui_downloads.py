"""The Get models page through NiceGUI's simulated user, against the local Hub stand-in: search, open a repo, see
its variants with a fit, download one, watch the job finish, and the model is in the library."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nicegui.testing import User

from tests.fake_hub import FakeHub, FakeRepo, serve_hub

REPO = 'lap-test/solo-GGUF'


@pytest.fixture
async def hub_env(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    hub = FakeHub()
    folder = tmp_path / 'hub'
    folder.mkdir()
    shutil.copy(tiny_model, folder / 'solo-Q8_0.gguf')
    hub.add(FakeRepo(REPO, folder, downloads=3, likes=1))
    shelf = tmp_path / 'shelf'
    shelf.mkdir()
    async with serve_hub(hub):
        monkeypatch.setenv('LAP_HF_ENDPOINT', hub.base_url)
        monkeypatch.setenv('LAP_MODELS_DIRS', str(shelf))
        yield shelf


async def test_search_open_download_and_it_is_a_model(hub_env: Path, user: User) -> None:
    await user.open('/downloads')
    await user.should_see('No downloads yet.')
    user.find(marker='hub-query').type('solo')
    user.find(marker='hub-search').click()
    await user.should_see(REPO)
    await user.should_see('3 downloads · 1 likes · updated 2026-11-30')
    user.find(marker='hub-result').click()
    await user.should_see('Q8_0')
    await user.should_see('fits', retries=50)  # the fit from the file's header, fetched by range request
    user.find(marker='hub-download').click()
    await user.should_see('done', marker='download-state', retries=100)
    await user.should_see('it is in the Models list')
    assert (hub_env / 'lap-test_solo-GGUF' / 'solo-Q8_0.gguf').exists()
    await user.open('/models')
    await user.should_see('solo-q8_0', retries=50)
