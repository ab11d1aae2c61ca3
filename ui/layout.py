"""The shared frame: header with app name and status, left navigation, page title."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi.responses import RedirectResponse
from nicegui import context, ui

if TYPE_CHECKING:
    from core.events import Event
    from core.system import System

NAV = (
    ('Dashboard', '/', 'dashboard'),
    ('Models', '/models', 'storage'),
    ('Monitoring', '/monitoring', 'show_chart'),
    ('Logs', '/logs', 'article'),
    ('Settings', '/settings', 'settings'),
    ('Chat', '/chat', 'chat'),
)


def subscribe(system: System, topics: Iterable[str], handler: Callable[[Event], Any]) -> None:
    """Subscribe this page's client to core events; unsubscribed when the client goes away."""
    client = context.client
    sub = system.bus.subscribe(topics, handler)
    client.on_delete(sub.close)
    client.on_disconnect(sub.close)


def page(system: System, path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@page(system, '/models')`: a NiceGUI page that, with API keys set, sends a browser without a login to
    `/login` before anything is built. The path is registered with the auth guard as one that checks for itself."""
    system.proxy.auth.pages.add(path)

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(build)  # NiceGUI reads the query parameters from the signature
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            from ui.login import authorised

            if not authorised(system):
                return RedirectResponse(f'/login?next={quote(path)}', status_code=303)
            result = build(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        ui.page(path)(guarded)
        return build

    return decorate


def binary_status(system: System) -> tuple[str, str]:
    b = system.binary.current
    if b is None:
        return 'llama-server missing', 'negative'
    return f'llama-server {b.version}', 'positive'


@contextmanager
def frame(system: System, title: str) -> Iterator[None]:
    ui.colors(primary='#4f46e5')
    with ui.header(elevated=True).classes('items-center gap-4 px-4 py-2'):
        ui.button(on_click=lambda: drawer.toggle(), icon='menu').props('flat color=white dense')
        ui.label('Llama Async Proxy').classes('text-lg font-semibold')
        ui.space()
        text, color = binary_status(system)
        ui.badge(text, color=color).props('outline').classes('text-white').mark('binary-status')
    with ui.left_drawer(value=True, bordered=True).classes('bg-gray-50') as drawer:
        with ui.column().classes('gap-1 w-full'):
            for label, path, icon in NAV:
                with ui.link(target=path).classes('no-underline w-full').mark(f'nav-{label.lower()}'):
                    with ui.row().classes('items-center gap-3 px-3 py-2 rounded hover:bg-indigo-50 w-full'):
                        ui.icon(icon).classes('text-indigo-600')
                        ui.label(label).classes('text-gray-800')
    with ui.column().classes('w-full p-4 gap-4'):
        ui.label(title).classes('text-2xl font-semibold')
        yield


def fact(label: str, value: str) -> None:
    with ui.row().classes('gap-2 items-baseline'):
        ui.label(f'{label}:').classes('text-gray-500')
        ui.label(value).classes('font-mono break-all')


def coming(text: str) -> None:
    """For a part of a page whose service is not built yet: say what it will show, never invent numbers."""
    with ui.card().classes('w-full bg-indigo-50'):
        ui.label(text).classes('text-gray-700')
