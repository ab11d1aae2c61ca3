"""The front door: a raw ASGI dispatcher that runs before the app's middleware stack.

NiceGUI installs `BaseHTTPMiddleware`s that move every body chunk between tasks and hide client disconnects;
`app.mount` does not escape them. The proxy's data path (`/v1/*`, `/upstream/*`, ...) and long-lived streams
(`/api/events`) are therefore registered here as plain ASGI handlers. Guards (auth, Host allowlist) run here for
every HTTP and websocket request, so they also cover `/api/*` and the pages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# A guard returns None to let the request pass, or an ASGI app that answers it (e.g. a 401).
Guard = Callable[[Scope], ASGIApp | None]


class FrontDoor:
    def __init__(self) -> None:
        self._exact: dict[str, ASGIApp] = {}
        self._prefixes: list[tuple[str, ASGIApp]] = []
        self._guards: list[Guard] = []

    def route(self, path: str, handler: ASGIApp, *, prefix: bool = False) -> None:
        """Serve `path` (or everything under it when `prefix`) with `handler`, outside the middleware stack."""
        if prefix:
            self._prefixes.append((path, handler))
            self._prefixes.sort(key=lambda p: -len(p[0]))  # longest prefix wins
        else:
            self._exact[path] = handler

    def guard(self, guard: Guard) -> None:
        self._guards.append(guard)

    def handler_for(self, path: str) -> ASGIApp | None:
        handler = self._exact.get(path)
        if handler is not None:
            return handler
        for prefix, h in self._prefixes:
            if path.startswith(prefix):
                return h
        return None

    def wrap(self, inner: ASGIApp) -> ASGIApp:
        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            if scope['type'] in ('http', 'websocket'):
                for guard in self._guards:
                    deny = guard(scope)
                    if deny is not None:
                        await deny(scope, receive, send)
                        return
                if scope['type'] == 'http':
                    handler = self.handler_for(scope['path'])
                    if handler is not None:
                        await handler(scope, receive, send)
                        return
            await inner(scope, receive, send)

        return dispatch

    def install(self, app: Any) -> None:
        """Wrap a Starlette/FastAPI app's middleware stack (built lazily on the first request)."""
        build = app.build_middleware_stack

        def build_wrapped() -> ASGIApp:
            return self.wrap(build())

        app.build_middleware_stack = build_wrapped
        app.middleware_stack = None
