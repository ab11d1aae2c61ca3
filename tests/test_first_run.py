"""First run with no models (issue 16): the dashboard and the Models page offer both ways in; the demo model is
made on the spot, lands in the library and chats (random weights) through the proxy, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nicegui.testing import User

from core.library.demo import DEMO_FILE, DEMO_NAME
from tests.serving import serve


async def test_no_models_offers_both_ways_and_the_demo_appears(user: User) -> None:
    await user.open('/')
    await user.should_see('No models yet')
    await user.should_see('Find one on Hugging Face')
    await user.open('/models')
    await user.should_see('No models yet')
    user.find(marker='make-demo').click()
    await user.should_see('Demo model created', retries=100)
    await user.should_see('demo-tiny-random-weights', retries=50)
    await user.should_not_see('No models yet')


async def test_the_demo_model_serves_a_chat_and_its_folder_is_saved(system_factory: Any, tmp_path: Path) -> None:
    system = await system_factory(scan_well_known_dirs=False)  # no models folder set
    assert system.library.models() == []
    path = await system.create_demo_model()
    assert path.name == DEMO_FILE and path.parent == system.data_dir / 'models'
    assert system.config.settings.models_dirs == [path.parent]  # saved, so it is found at the next start too
    [entry] = system.library.models()
    assert entry.meta.name == DEMO_NAME  # it says what it is
    async with serve(system) as s, s.client() as client:
        body = {'model': entry.id, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}
        r = await client.post('/v1/chat/completions', json=body)
    assert r.status_code == 200, r.text
