"""Pages subscribe to core events per browser tab and must unsubscribe when the tab goes away."""

from __future__ import annotations

from nicegui import Client, app
from nicegui.testing import User

from tests.conftest import wait_for


async def test_no_subscriber_leak_after_300_page_visits(user: User) -> None:
    system = app.state.system
    await user.open('/')
    await wait_for(lambda: system.started)  # services subscribe while starting
    baseline = system.bus.subscriber_count
    per_page = None
    for _ in range(300):
        await user.open('/logs')
        per_page = per_page or system.bus.subscriber_count - baseline
        assert per_page == 3 and system.bus.subscriber_count == baseline + per_page  # header: 2, log view: 1
        assert user.client is not None
        user.client.delete()  # what NiceGUI does once a tab has been gone past its reconnect timeout
    assert system.bus.subscriber_count == baseline
    assert not [c for c in Client.instances.values() if c.page.path == '/logs']
