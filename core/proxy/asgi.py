"""Small raw-ASGI helpers for the data path: bounded body reading, replies, disconnect watching."""

from __future__ import annotations

from typing import Any

from core.frontdoor import Receive, Scope, Send
from core.proxy import jsonio
from core.proxy.errors import ProxyError

JSON = b'application/json'
SSE_HEADERS = [(b'cache-control', b'no-cache'), (b'x-accel-buffering', b'no')]


class ClientGone(Exception):
    """The client disconnected (seen on `receive()` or while sending)."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing with 413 as soon as it is known to exceed `limit` bytes."""
    for name, value in scope.get('headers') or ():
        if name == b'content-length':
            try:
                declared = int(value)
            except ValueError:
                raise ProxyError(400, 'invalid Content-Length', 'invalid_request_error', 'bad_length') from None
            if declared > limit:
                raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message['type'] == 'http.disconnect':
            raise ClientGone
        body = message.get('body', b'')
        if body:
            size += len(body)
            if size > limit:
                raise too_large(limit)
            chunks.append(body)
        if not message.get('more_body', False):
            return b''.join(chunks)


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        f'request body over the {limit} byte limit (max_body_bytes)',
        'invalid_request_error',
        'body_too_large',
    )


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client goes away (call only after the body was read)."""
    while True:
        message = await receive()
        if message['type'] == 'http.disconnect':
            return


class Reply:
    """Tracks what was sent, so an error after the headers can still be told to the client the right way."""

    __slots__ = ('_send', 'ended', 'sent_bytes', 'sse', 'started', 'status')

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.status: int | None = None
        self.sse = False
        self.sent_bytes = 0
        self.ended = False  # the last body message was sent: a disconnect now is just the connection closing

    async def start(self, status: int, headers: list[tuple[bytes, bytes]], sse: bool = False) -> None:
        self.started, self.status, self.sse = True, status, sse
        await self._call({'type': 'http.response.start', 'status': status, 'headers': headers})

    async def body(self, data: bytes, more: bool = True) -> None:
        self.sent_bytes += len(data)
        self.ended = not more
        await self._call({'type': 'http.response.body', 'body': data, 'more_body': more})

    async def _call(self, message: dict[str, Any]) -> None:
        try:
            await self._send(message)
        except OSError as e:  # uvicorn raises ClientDisconnected (an OSError) after the client left
            raise ClientGone from e

    async def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = jsonio.dumps(obj)
        hdrs = [(b'content-type', JSON), (b'content-length', str(len(data)).encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await self.start(status, hdrs)
        await self.body(data, more=False)

    async def error(self, err: ProxyError) -> None:
        """Before the headers: a JSON error response. Mid-stream: a final SSE `error` event (never `[DONE]`)."""
        if not self.started:
            await self.json(err.status, err.payload(), err.headers)
        elif self.sse:
            await self.body(b'event: error\ndata: ' + err.body() + b'\n\n', more=False)
        # Any other body cut short is left incomplete: the server then drops the connection, so the client can
        # tell it from a complete answer.
