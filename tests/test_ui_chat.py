"""The chat playground streams a real reply from llama-server through the proxy's own path."""

from __future__ import annotations

from pathlib import Path

from nicegui import app, ui
from nicegui.testing import User

from tests.conftest import wait_for


async def test_chat_streams_a_reply_and_records_it(models_env: Path, user: User) -> None:
    await user.open('/chat')
    system = app.state.system
    await wait_for(lambda: system.library.get('tiny-llama'))
    await user.open('/chat')
    user.find(marker='chat-model').elements.pop().set_value('tiny-llama')
    user.find(marker='chat-input').type('Hello there')
    user.find(marker='chat-send').click()
    await user.should_see('completion tokens', retries=100)  # figures from the real reply's usage/timings
    reply = user.find(marker='chat-reply').elements.pop()
    text = ' '.join(e.content for e in reply.descendants() if isinstance(e, ui.markdown))
    assert text.strip() and 'Error' not in text
    assert system.scheduler.describe('tiny-llama')['status'] == 'ready'  # started on demand
    rows = system.proxy.activity.recent(limit=5)
    assert rows[0]['client'].startswith('playground') and rows[0]['status'] == 200
