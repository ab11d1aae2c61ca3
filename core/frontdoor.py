"""The front door: raw ASGI routes taken before the app itself (FastAPI, its middleware stack) sees the request.

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

    def denied(self, scope: Scope) -> ASGIApp | None:
        """The answer of the first guard that refuses this request, or None."""
        for guard in self._guards:
            deny = guard(scope)
            if deny is not None:
                return deny
        return None

    def install(self, app: Any) -> None:
        """Serve the routes ahead of a Starlette/FastAPI app, and run the guards for everything else too.

        Routed HTTP requests are taken at the app's own `__call__`, before FastAPI looks for OpenTelemetry
        providers and Starlette builds its scope (~13 us a request here, `bench/proxy_timeline.py`): `__call__` is
        looked up on the type, so the app gets a subclass that only adds that. Every other request goes through
        the app's middleware stack, with the guards put in front of it (the stack is built lazily). Installing
        again on the same app (NiceGUI's test plugin rebuilds the system around one app) replaces the door."""
        app._lap_front_door = self
        app.middleware_stack = None
        if getattr(type(app), '_lap_front_door_class', False):
            return
        build = app.build_middleware_stack

        def build_guarded() -> ASGIApp:
            inner = build()

            async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
                door: FrontDoor = app._lap_front_door
                deny = door.denied(scope) if scope['type'] in ('http', 'websocket') else None
                await (deny or inner)(scope, receive, send)

            return guarded

        app.build_middleware_stack = build_guarded
        base = type(app)

        async def __call__(app_self: Any, scope: Scope, receive: Receive, send: Send) -> None:
            door: FrontDoor = app_self._lap_front_door
            handler = door.handler_for(scope['path']) if scope['type'] == 'http' else None
            if handler is None:
                await base.__call__(app_self, scope, receive, send)
            else:
                await (door.denied(scope) or handler)(scope, receive, send)

        namespace = {'__call__': __call__, '__module__': base.__module__, '_lap_front_door_class': True}
        app.__class__ = type(base.__name__, (base,), namespace)
