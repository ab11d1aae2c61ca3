"""The front door: raw ASGI routes taken before the app itself (FastAPI, its middleware stack) sees the request.

NiceGUI installs `BaseHTTPMiddleware`s that move every body chunk between tasks and hide client disconnects;
`app.mount` does not escape them. The proxy's data path (`/v1/*`, `/upstream/*`, ...) and long-lived streams
(`/api/events`) are therefore registered here as plain ASGI handlers. Guards (auth, Host allowlist) run here for
every HTTP and websocket request, so they also cover `/api/*` and the pages.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# A guard returns None to let the request pass, or an ASGI app that answers it (e.g. a 401). A guard that lets a
# request pass may put headers for its answer under `scope[RESPONSE_HEADERS]` (CORS does).
Guard = Callable[[Scope], ASGIApp | None]
RESPONSE_HEADERS = 'lap.response_headers'
# Set by the fast lane (core/proxy/fastlane.py), which runs the guards before the ASGI path does: their answer (None:
# passed), so that a request handed on is not checked (and rate-counted) twice.
GUARDED = 'lap.guarded'
# Pages and the API in no other site's frame (clickjacking); the proxy's answers are not rendered, so skip them.
NO_FRAMING = ((b'x-frame-options', b'DENY'), (b'content-security-policy', b"frame-ancestors 'none'"))


def error_app(
    status: int, message: str, type_: str, code: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> ASGIApp:
    """An ASGI app answering the OpenAI error shape (a websocket is closed with 1008, policy violation)."""
    body = json.dumps({'error': {'message': message, 'type': type_, 'code': code}}).encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope['type'] == 'websocket':
            await send({'type': 'websocket.close', 'code': 1008})
            return
        out = [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()), *headers]
        await send({'type': 'http.response.start', 'status': status, 'headers': out})
        await send({'type': 'http.response.body', 'body': body})

    return app


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message['type'] == 'http.response.start':
            message = {**message, 'headers': [*message.get('headers', ()), *extra]}
        await send(message)

    return wrapped


class _BodyLimit:
    """`receive` for the app's own routes, counting body bytes: over `limit`, the client gets 413 and the app a
    disconnect, so no route reads a body whole before it knows the size (the proxy routes count in `read_body`)."""

    __slots__ = ('_receive', '_send', 'limit', 'refused', 'size')

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.size = 0
        self.refused = False

    async def receive(self) -> MutableMapping[str, Any]:
        if self.refused:
            return {'type': 'http.disconnect'}
        message = await self._receive()
        if message['type'] == 'http.request':
            self.size += len(message.get('body', b''))
            if self.size > self.limit:
                await self.refuse()
                return {'type': 'http.disconnect'}
        return message

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if not self.refused:  # after a 413 the app's own answer has nowhere to go
            await self._send(message)

    async def refuse(self) -> None:
        self.refused = True
        await too_large(self.limit)({'type': 'http'}, self._receive, self._send)


def too_large(limit: int) -> ASGIApp:
    # No `connection: close`: a client still sending would meet a reset before it reads the 413. uvicorn reads
    # and drops the rest; a client that stops sending is closed by core/httpguard.py.
    message = f'request body over the {limit} byte limit (max_body_bytes)'
    return error_app(413, message, 'invalid_request_error', 'body_too_large')


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get('headers') or ():
        if name == b'content-length':
            try:
                return int(value)
            except ValueError:
                return None
    return None


class FrontDoor:
    def __init__(self) -> None:
        self._exact: dict[str, ASGIApp] = {}
        self._prefixes: list[tuple[str, ASGIApp]] = []
        self._guards: list[Guard] = []
        self.body_limit: Callable[[], int] | None = None  # bytes, for the app's own routes (`max_body_bytes`)

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

    async def dispatch(self, scope: Scope, receive: Receive, send: Send, inner: ASGIApp) -> None:
        """`inner` behind the guards, with the headers a guard asked for added to the answer (a refusal by a later
        guard too: a listed origin must be able to read its 401 or 429)."""
        deny = scope[GUARDED] if GUARDED in scope else self.denied(scope)
        extra = scope.get(RESPONSE_HEADERS)
        await (deny or inner)(scope, receive, _with_headers(send, extra) if extra else send)

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
                if scope['type'] == 'http' and door.body_limit is not None:
                    limit = door.body_limit()
                    declared = _declared_length(scope)
                    if declared is not None and declared > limit:
                        await too_large(limit)(scope, receive, send)
                        return
                    counted = _BodyLimit(receive, send, limit)
                    receive, send = counted.receive, counted.send
                if scope['type'] in ('http', 'websocket'):
                    scope[RESPONSE_HEADERS] = list(NO_FRAMING)
                    await door.dispatch(scope, receive, send, inner)
                else:
                    await inner(scope, receive, send)

            return guarded

        app.build_middleware_stack = build_guarded
        base = type(app)

        async def __call__(app_self: Any, scope: Scope, receive: Receive, send: Send) -> None:
            door: FrontDoor = app_self._lap_front_door
            handler = door.handler_for(scope['path']) if scope['type'] == 'http' else None
            if handler is None:
                await base.__call__(app_self, scope, receive, send)
            else:
                await door.dispatch(scope, receive, send, handler)

        namespace = {'__call__': __call__, '__module__': base.__module__, '_lap_front_door_class': True}
        app.__class__ = type(base.__name__, (base,), namespace)
