"""Many tabs at once: 20 simulated clients on the dashboard and monitoring, then closed, leave no subscriber, timer,
scheduled redraw or task behind; a socket blip (disconnect, reconnect) keeps a tab's subscriptions."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import httpx
from nicegui import Client, app, core, ui
from nicegui.nicegui import _on_handshake
from nicegui.testing import User

from tests.conftest import wait_for

PAGES = ('/', '/monitoring')


def timers() -> int:
    """`ui.timer` elements alive in any client."""
    return sum(isinstance(e, ui.timer) for c in list(Client.instances.values()) for e in list(c.elements.values()))


def scheduled_redraws() -> int:
    """`live()` redraws waiting on the loop (its call_later handles), not cancelled."""
    loop: Any = asyncio.get_running_loop()
    return sum(
        1
        for h in getattr(loop, '_scheduled', [])
        if not h.cancelled() and getattr(getattr(h, '_callback', None), '__module__', '') == 'ui.layout'
    )


def new_tasks(baseline: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t not in baseline and t is not asyncio.current_task() and not t.done()]


def new_user() -> User:
    """Another browser (its own cookies and tab) on the app the `user` fixture started: no second lifespan."""
    return User(httpx.AsyncClient(transport=httpx.ASGITransport(core.app), base_url='http://test'))


async def settle(baseline: set[asyncio.Task[Any]]) -> None:
    """Wait until no task is left beyond `baseline` (the sampler's own short-lived ones come and go)."""
    try:
        await wait_for(lambda: not new_tasks(baseline), deadline_s=10)
    except AssertionError:
        raise AssertionError(f'tasks left: {[describe(t) for t in new_tasks(baseline)]}') from None


def describe(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=3)
    where = ' <- '.join(f'{f.f_code.co_filename.rsplit("/", 2)[-1]}:{f.f_lineno} {f.f_code.co_name}' for f in frames)
    return f'{task.get_name()} ({where})'


async def answered(baseline: set[asyncio.Task[Any]]) -> None:
    """Wait until the pages' connect handlers are done (the drawer asks the browser for its state): a client deleted
    with a question pending logs a JavaScript timeout a second later."""
    await wait_for(lambda: not [t for t in new_tasks(baseline) if t.get_name().startswith('func with client')])


async def test_20_clients_closed_leave_no_subscriber_timer_or_task(user: User) -> None:
    system = app.state.system
    await wait_for(lambda: system.started)
    first = set(asyncio.all_tasks())
    for path in PAGES:  # the first visit of each page builds its one-time state (imports, the first sample)
        await user.open(path)
    await answered(first)
    for c in [c for c in Client.instances.values() if c.page.path in PAGES]:
        c.delete()
    await settle(first)
    base_tasks = set(asyncio.all_tasks())
    base_subs, base_timers = system.bus.subscriber_count, timers()

    users = [new_user() for _ in range(20)]
    clients: list[Client] = []
    per_page: dict[str, int] = {}
    try:
        for i, u in enumerate(users):
            path = PAGES[i % 2]
            before = system.bus.subscriber_count
            clients.append(await u.open(path))
            per_page.setdefault(path, system.bus.subscriber_count - before)
        assert all(n > 0 for n in per_page.values()), per_page  # every page subscribes to something
        assert system.bus.subscriber_count == base_subs + 10 * sum(per_page.values())
        assert all(c.has_socket_connection and not c.is_deleted for c in clients)
        assert len({c.id for c in clients}) == 20
        await answered(base_tasks)
        outboxes = [t for t in new_tasks(base_tasks) if t.get_name().startswith('outbox loop')]
        assert len(outboxes) == 20  # what is left running per client while it lives: its outbox
        # A core event schedules each page's redraws at once (before the loop runs them): some are waiting now.
        system.bus.publish('models', 'library', {'added': [], 'removed': [], 'changed': [], 'count': 0})
        assert scheduled_redraws() > 0

        for c in clients:
            c.delete()  # what NiceGUI does once a tab has been gone past its reconnect timeout

        assert system.bus.subscriber_count == base_subs
        ids = {c.id for c in clients}
        assert not [c for c in Client.instances.values() if c.id in ids or c.page.path in PAGES]
        assert timers() == base_timers
        assert scheduled_redraws() == 0
        await settle(base_tasks)  # outboxes and page updates in flight end; nothing per client keeps running
    finally:
        for u in users:
            await u.http_client.aclose()


async def test_a_socket_blip_keeps_the_subscriptions_and_delete_ends_them(user: User) -> None:
    system = app.state.system
    await wait_for(lambda: system.started)  # no page open: a live page's idle outbox keeps making wait tasks
    base_subs = system.bus.subscriber_count
    base_tasks = set(asyncio.all_tasks())
    base_timers = timers()
    client = await user.open('/logs')
    subscribed = system.bus.subscriber_count
    assert subscribed > base_subs
    assert timers() == base_timers + 1  # the log view's batch timer

    socket_id, document_id = next(iter(client._socket_to_document_id.items()))
    client.handle_disconnect(socket_id)  # the socket drops: on_disconnect runs, deletion waits for the timeout
    assert not client.has_socket_connection and not client.is_deleted
    assert system.bus.subscriber_count == subscribed
    system.logs.add('app', 'said while the socket was down', 'warning')
    await user.should_see('said while the socket was down')  # the page is still updated meanwhile

    reconnected = await _on_handshake(
        f'test-{uuid4()}', {'client_id': client.id, 'tab_id': user.tab_id, 'document_id': document_id}
    )
    assert reconnected and client.has_socket_connection
    assert not client._delete_tasks  # the reconnect cancelled the pending deletion
    system.logs.add('app', 'said after the reconnect', 'warning')
    await user.should_see('said after the reconnect')
    assert system.bus.subscriber_count == subscribed

    await answered(base_tasks)  # the reconnect asked the drawer's state again
    client.delete()
    assert system.bus.subscriber_count == base_subs
    assert timers() == base_timers
    await settle(base_tasks)  # the timer's loop and its invocation ended with the client
