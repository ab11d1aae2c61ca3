"""In-process chat for the UI playground: runs the proxy's own ASGI handler, so on-demand start, request
parameters, activity recording and errors are exactly what an API client gets, without a socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.frontdoor import ASGIApp
from core.proxy.sse import SSEObjects


@dataclass
class ChatTurn:
    """What the playground shows while a reply streams in, and its figures at the end."""

    content: str = ''
    reasoning: str = ''
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    tokens: int = 0  # deltas with content or reasoning: llama-server streams one token per delta
    first_token_at: float | None = None  # time.perf_counter() when the first of them was parsed


async def chat_stream(handler: ASGIApp, body: dict[str, Any]) -> AsyncIterator[ChatTurn]:
    """Yield the growing reply of a streaming `/v1/chat/completions` call; closing the iterator cancels it."""
    payload = json.dumps({**body, 'stream': True, 'stream_options': {'include_usage': True}}).encode()
    scope = {
        'type': 'http',
        'asgi': {'version': '3.0'},
        'http_version': '1.1',
        'method': 'POST',
        'scheme': 'http',
        'path': '/v1/chat/completions',
        'raw_path': b'/v1/chat/completions',
        'root_path': '',
        'query_string': b'',
        'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(payload)).encode())],
        'client': ('playground', 0),
        'server': ('127.0.0.1', 0),
    }
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {'type': 'http.request', 'body': payload, 'more_body': False}
        await gone.wait()
        return {'type': 'http.disconnect'}

    async def send(message: Any) -> None:
        await messages.put(message)

    task: asyncio.Future[None] = asyncio.ensure_future(handler(scope, receive, send))
    turn = ChatTurn()
    parser = SSEObjects()
    status = 200
    raw = b''
    getter: asyncio.Future[Any] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            waiting: set[asyncio.Future[Any]] = {getter, task}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if messages.empty():
                    break
                continue
            message = getter.result()
            if message['type'] == 'http.response.start':
                status = message['status']
                continue
            chunk = message.get('body', b'')
            if status >= 400:
                raw += chunk
            else:
                for obj in parser.feed(chunk):
                    _apply(turn, obj)
                yield turn
            if not message.get('more_body', False):
                break
        if status >= 400:
            turn.error = _error_text(raw) or f'HTTP {status}'
            yield turn
    finally:
        if getter is not None:
            getter.cancel()  # a cancel (Stop) lands while it waits: it would be left pending
        gone.set()  # the handler's receive() now reports a disconnect, which cancels the upstream generation
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)


def _apply(turn: ChatTurn, obj: dict[str, Any]) -> None:
    if 'error' in obj:
        err = obj['error']
        turn.error = err.get('message') if isinstance(err, dict) else str(err)
        return
    if str(obj.get('id', '')).startswith('loading-'):
        return  # `send_loading_state`'s progress as reasoning: the page shows the load itself
    for choice in obj.get('choices') or []:
        delta = choice.get('delta') or {}
        content, reasoning = delta.get('content') or '', delta.get('reasoning_content') or ''
        if content or reasoning:
            turn.tokens += 1
            if turn.first_token_at is None:
                turn.first_token_at = time.perf_counter()
        turn.content += content
        turn.reasoning += reasoning
        if choice.get('finish_reason'):
            turn.finish_reason = choice['finish_reason']
    if obj.get('usage'):
        turn.usage = obj['usage']
    if obj.get('timings'):
        turn.timings = obj['timings']


def _error_text(raw: bytes) -> str | None:
    try:
        err = json.loads(raw).get('error') or {}
    except (ValueError, AttributeError):
        return raw.decode(errors='replace')[:500] or None
    return err.get('message') if isinstance(err, dict) else str(err)
