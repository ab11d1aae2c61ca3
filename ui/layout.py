"""The shared frame and the three helpers every page uses: `page` (auth, title, active nav, frame), `live` (redraw
when core events fire, at most every N ms, and after each reconnect) and `notify` (a toast that reaches the user
even when the element that asked for it has been redrawn away).

Lifecycles (see ../shared/reference/ui.md): NiceGUI runs `on_disconnect` on every socket blip and a reconnect does
not run the page again, so whatever a page opens for its lifetime closes in `client.on_delete`, and a reconnect
asks each live part for a fresh snapshot through `client.on_connect`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi.responses import RedirectResponse
from nicegui import Client, app, background_tasks, context, ui

from ui.components.header import Header

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

log = logging.getLogger(__name__)

APP_NAME = 'Llama Async Proxy'
NAV = (
    ('Dashboard', '/', 'dashboard'),
    ('Models', '/models', 'storage'),
    ('Get models', '/downloads', 'cloud_download'),
    ('Activity', '/activity', 'history'),
    ('Monitoring', '/monitoring', 'show_chart'),
    ('Nodes', '/nodes', 'lan'),
    ('Logs', '/logs', 'article'),
    ('Chat', '/chat', 'chat'),
    ('Settings', '/settings', 'settings'),
)
THEMES = {
    None: ('brightness_auto', 'Theme: auto'),
    False: ('light_mode', 'Theme: light'),
    True: ('dark_mode', 'Theme: dark'),
}
THEME_KEY = 'theme'

# Shown while NiceGUI's socket is down: it un-hides its own #popup then, so CSS alone follows the connection.
CSS = """
.lap-offline { display: none !important; }
body:has(#popup[aria-hidden="false"]) .lap-offline { display: flex !important; }
body:has(#popup[aria-hidden="false"]) .lap-online { display: none !important; }
.lap-wrap pre, .lap-wrap code { white-space: pre-wrap !important; word-break: break-all; }
.nicegui-log .q-scrollarea__content { white-space: pre-wrap; word-break: break-word; }
.nicegui-log .q-scrollarea__content > * { width: 100%; }
/* Chat bubbles in the app's colours, readable in both themes (Quasar paints a bubble with currentColor). */
.body--light .q-message-text--received { color: #eef2ff; }
.body--light .q-message-text-content--received { color: #111827; }
.body--light .q-message-text--sent { color: #e5e7eb; }
.body--dark .q-message-text--received { color: #262a40; }
.body--dark .q-message-text-content--received { color: #e5e7eb; }
.body--dark .q-message-text--sent { color: #3730a3; }
.body--dark .q-message-text-content--sent { color: #f9fafb; }
.body--dark .text-red-600 { color: #f87171; }
.body--dark .text-amber-600 { color: #fbbf24; }
.lap-nav-active { background: rgba(79, 70, 229, 0.14); font-weight: 600; }
.body--dark .lap-muted { color: #9ca3af; }
.body--light .lap-muted { color: #6b7280; }
"""


def subscribe(system: System, topics: Iterable[str], handler: Callable[[Event], Any]) -> None:
    """Subscribe this page's client to core events for as long as the client lives (not the socket)."""
    client = context.client
    sub = system.bus.subscribe(topics, handler)
    client.on_delete(sub.close)


def on_reconnect(handler: Callable[[], Any]) -> None:
    """Run `handler` each time this client's socket comes back (not on the first connect)."""
    client = context.client
    seen = {'connects': 0}

    def connected() -> None:
        seen['connects'] += 1
        if seen['connects'] > 1:
            handler()

    client.on_connect(connected)


def live(system: System, topics: Iterable[str], redraw: Callable[[], Any], every_ms: int = 300) -> Callable[[], None]:
    """Call `redraw()` (sync or async) at most once per `every_ms` after any event on `topics`, and once after each
    reconnect, inside this client's context. Returns the function that asks for a redraw (for a page's own use).

    Event-driven rather than a polling timer: an idle page costs nothing, and a burst of events is one redraw."""
    client = context.client
    loop = asyncio.get_running_loop()
    # busy: an async redraw is still running; again: something fired meanwhile (one more redraw after it, not a
    # second one alongside it: each would read core again, e.g. free memory in a thread)
    pending: dict[str, Any] = {'handle': None, 'last': -1e9, 'busy': False, 'again': False}

    def run() -> None:
        pending['handle'] = None
        if client.is_deleted:
            return
        if pending['busy']:
            pending['again'] = True
            return
        pending['last'] = loop.time()
        pending['busy'] = inspect.iscoroutinefunction(redraw)
        call_in(client, redraw, done=finished)

    def finished() -> None:
        pending['busy'] = False
        if pending['again']:
            pending['again'] = False
            poke()

    def poke(_event: Event | None = None) -> None:
        if pending['handle'] is not None or client.is_deleted:
            return
        delay = max(0.0, pending['last'] + every_ms / 1000 - loop.time())
        pending['handle'] = loop.call_later(delay, run)

    def closed() -> None:
        if pending['handle'] is not None:
            pending['handle'].cancel()
            pending['handle'] = None

    if topics:
        subscribe(system, topics, poke)
    on_reconnect(poke)
    client.on_delete(closed)
    return poke


def call_in(client: Client, fn: Callable[[], Any], done: Callable[[], Any] | None = None) -> None:
    """Run `fn` in `client`'s context; a coroutine function runs as a background task in it. `done()` runs after
    `fn` has finished, whatever the outcome."""
    if inspect.iscoroutinefunction(fn):

        async def run() -> None:
            try:
                with client:
                    await fn()
            except Exception:
                log.exception('page update failed')
            finally:
                if done is not None:
                    done()

        background_tasks.create(run(), name='page update')
        return
    try:
        with client:
            fn()
    except Exception:
        log.exception('page update failed')
    finally:
        if done is not None:
            done()


TOAST_MS = {'negative': 10000, 'warning': 6000}  # others 3 s: a stack of stale "saved" toasts misleads
TOAST_DEFAULT_MS = 3000


def notify(client: Client, message: str, **options: Any) -> None:
    """`ui.notify` through the client, never through an element a refresh may have deleted (capture `client` with
    `context.client` before the first await)."""
    if not client.is_deleted:
        options.setdefault('timeout', TOAST_MS.get(options.get('type', ''), TOAST_DEFAULT_MS))
        with client:
            ui.notify(message, **options)


class Working:
    """A toast with a spinner while a long action runs, replaced by its outcome: `done(message, type)`. Lives in the
    client (not in the element that started it), so a redraw meanwhile does not take it away."""

    def __init__(self, client: Client, message: str) -> None:
        self.client = client
        with client:
            self.note = ui.notification(message, spinner=True, timeout=None)

    def done(self, message: str, **options: Any) -> None:
        if not self.client.is_deleted:
            with self.client:
                self.note.dismiss()
        notify(self.client, message, **options)


def page(system: System, path: str, title: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@page(system, '/models', 'Models')`: a NiceGUI page titled "Models · Llama Async Proxy" inside the frame,
    with its nav entry marked. With API keys set, a browser without a login is sent to `/login` before anything is
    built. The path is registered with the auth guard as one that checks for itself."""
    system.proxy.auth.pages.add(path)

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(build)  # NiceGUI reads the query parameters from the signature
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            from ui.login import authorised

            if not authorised(system):
                return RedirectResponse(f'/login?next={quote(path)}', status_code=303)
            frame(system, title, path)
            with ui.column().classes('w-full p-4 gap-4 max-w-[1600px] mx-auto'):
                ui.label(title).classes('text-2xl font-semibold')
                result = build(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

        ui.page(path, title=f'{title} · {APP_NAME}')(guarded)
        return build

    return decorate


def frame(system: System, title: str, path: str) -> None:
    """Header, navigation drawer and theme: everything around a page's content."""
    ui.colors(primary='#4f46e5')
    ui.add_css(CSS)
    stored = app.storage.user.get(THEME_KEY)
    dark = ui.dark_mode(stored if stored in THEMES else None)
    drawer: ui.left_drawer  # the menu button toggles it; built below the header
    with ui.header(elevated=True).classes('items-center gap-2 px-3 py-2 bg-indigo-700 flex-nowrap'):
        ui.button(on_click=lambda: drawer.toggle(), icon='menu').props('flat color=white dense').mark('menu')
        ui.label(APP_NAME).classes('text-lg font-semibold whitespace-nowrap max-sm:hidden')
        ui.space()
        header = Header(system)
        theme = ui.button(on_click=lambda: cycle()).props('flat color=white dense round').mark('theme-toggle')

    with theme:
        tooltip = ui.tooltip()

    def show_theme() -> None:
        icon, tip = THEMES[dark.value]
        theme.props(f'icon={icon}')
        tooltip.set_text(tip)
        theme.props['aria-label'] = tip
        theme.update()

    def cycle() -> None:
        order = [None, False, True]
        dark.value = order[(order.index(dark.value) + 1) % 3]
        app.storage.user[THEME_KEY] = dark.value
        show_theme()

    show_theme()
    with ui.element('div').classes('lap-offline w-full justify-center py-1 bg-amber-300 text-black text-sm'):
        ui.label('Connection lost, reconnecting…').mark('reconnecting')
    # Closed, and opened by Quasar itself on a wide screen (show-if-above), which tells the server. NiceGUI's own
    # value=None asks the browser on every connect with a 1 s timeout that, on a busy machine, logs an ERROR.
    with ui.left_drawer(value=False, bordered=True).props('width=220 breakpoint=1024 show-if-above') as drawer:
        with ui.column().classes('gap-1 w-full'):
            for label, target, icon in NAV:
                active = target == path
                link = ui.link(target=target).classes('no-underline w-full text-inherit').mark(f'nav-{label.lower()}')
                if active:
                    link.props('aria-current=page')
                with (
                    link,
                    ui.row().classes('items-center gap-3 px-3 py-2 rounded w-full hover:bg-indigo-500/10') as row,
                ):
                    if active:
                        row.classes('lap-nav-active')
                    ui.icon(icon).classes('text-indigo-500')
                    ui.label(label)
    live(system, ['models', 'health'], header.update, every_ms=100)  # a state change shows at once
    live(system, ['metrics'], header.update, every_ms=1000)


def fact(label: str, value: str) -> None:
    with ui.row().classes('gap-2 items-baseline'):
        ui.label(f'{label}:').classes('lap-muted')
        ui.label(value).classes('font-mono break-all')


def empty(text: str) -> ui.label:
    """What an empty list or chart says instead of showing nothing."""
    return ui.label(text).classes('lap-muted italic')
