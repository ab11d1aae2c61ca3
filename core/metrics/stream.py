"""`GET /api/events?topics=metrics,models,logs,requests,alerts,config`: the event bus as Server-Sent Events.

A raw ASGI handler on the front door (outside NiceGUI's `BaseHTTPMiddleware`, which hides disconnects). The
client gets a `snapshot` event first (latest sample, every model's state, active alerts, recent log lines), then
each bus event as it happens (`event:` is the topic, `data:` the event as JSON, `id:` its sequence number), and a
heartbeat comment when nothing happened for `sse_heartbeat` seconds.

Backpressure: each client has a bounded queue (`sse_queue_size`). A client that does not keep up fills it, the
bus drops the subscription, and the stream ends with a `dropped` event when that can still be written; a write
that stays blocked longer than `send_timeout` ends it too. Memory per client is therefore bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from core.events import TOPICS, Event, Subscription

if TYPE_CHECKING:
    from core.frontdoor import Receive, Scope, Send
    from core.metrics import MetricsService

SNAPSHOT_LOG_LINES = 100
MAX_BATCH = 100  # events coalesced into one write


def format_sse(event: str, data: Any, id_: int | None = None) -> bytes:
    body = json.dumps(data, default=str, separators=(',', ':'))
    head = f'id: {id_}\n' if id_ is not None else ''
    return f'{head}event: {event}\ndata: {body}\n\n'.encode()


def format_event(e: Event) -> bytes:
    return format_sse(e.topic, e.as_dict(), e.seq)


class EventStream:
    def __init__(self, service: MetricsService) -> None:
        self.service = service
        self.send_timeout = 10.0  # seconds one write may stay blocked before the client is dropped
        self.active = 0  # open streams, for tests and the monitoring page

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope['method'] != 'GET':
            await _plain(send, 405, {'error': 'use GET'}, [(b'allow', b'GET')])
            return
        query = parse_qs(scope.get('query_string', b'').decode('latin-1'))
        raw = ','.join(query.get('topics', []))
        topics = [t.strip() for t in raw.split(',') if t.strip()] or list(TOPICS)
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:
            await _plain(send, 400, {'error': f'unknown topics {unknown}; choose from {list(TOPICS)}'})
            return
        settings = self.service.config.settings
        # Subscribe before building the snapshot so nothing that happens in between is lost.
        sub = self.service.bus.queue(topics, maxsize=settings.sse_queue_size)
        self.active += 1
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await send(
                {
                    'type': 'http.response.start',
                    'status': 200,
                    'headers': [
                        (b'content-type', b'text/event-stream; charset=utf-8'),
                        (b'cache-control', b'no-cache'),
                        (b'x-accel-buffering', b'no'),
                    ],
                }
            )
            first = b'retry: 3000\n\n' + format_sse('snapshot', self.snapshot(topics))
            if await self._write(send, first, sub, disconnected):
                await self._pump(send, sub, disconnected, settings.sse_heartbeat)
            if not disconnected.done():  # end the response cleanly when the client can still take it
                await self._write(send, b'', None, disconnected, timeout=1.0, more=False)
        finally:
            sub.close()
            disconnected.cancel()
            self.active -= 1

    def snapshot(self, topics: list[str]) -> dict[str, Any]:
        svc = self.service
        snap: dict[str, Any] = {'topics': topics, 'ts': time.time()}
        if 'metrics' in topics:
            snap['metrics'] = svc.latest
        if 'models' in topics:
            snap['models'] = svc.models_snapshot()
        if 'alerts' in topics:
            snap['alerts'] = svc.alerts.snapshot()['active']
        if 'logs' in topics and svc.logs is not None:
            snap['logs'] = [r.as_dict() for r in svc.logs.query(limit=SNAPSHOT_LOG_LINES)]
        return snap

    async def _pump(self, send: Send, sub: Subscription, disconnected: asyncio.Future[None], heartbeat: float) -> None:
        while True:
            getter: asyncio.Future[Any] = asyncio.ensure_future(sub.get())
            waiting: set[asyncio.Future[Any]] = {getter, disconnected}
            done, _ = await asyncio.wait(waiting, timeout=heartbeat, return_when='FIRST_COMPLETED')
            if disconnected in done:
                getter.cancel()
                return
            if getter not in done:
                getter.cancel()
                chunk = f': heartbeat {time.time():.0f}\n\n'.encode()
            else:
                try:
                    events = [getter.result()]
                except ConnectionAbortedError:
                    await self._dropped(send, sub, disconnected)
                    return
                while sub.queue is not None and not sub.queue.empty() and len(events) < MAX_BATCH:
                    events.append(sub.queue.get_nowait())
                chunk = b''.join(format_event(e) for e in events)
            if sub.dropped:
                await self._dropped(send, sub, disconnected)
                return
            if not await self._write(send, chunk, sub, disconnected):
                return

    async def _dropped(self, send: Send, sub: Subscription, disconnected: asyncio.Future[None]) -> None:
        note = {'reason': 'client too slow: event queue overflowed', 'queue_size': sub.queue and sub.queue.maxsize}
        await self._write(send, format_sse('dropped', note), None, disconnected, timeout=1.0)

    async def _write(
        self,
        send: Send,
        chunk: bytes,
        sub: Subscription | None,
        disconnected: asyncio.Future[None],
        timeout: float | None = None,
        more: bool = True,
    ) -> bool:
        """Send one chunk; False when the client left, was dropped, or the write stayed blocked too long."""
        task: asyncio.Future[Any] = asyncio.ensure_future(
            send({'type': 'http.response.body', 'body': chunk, 'more_body': more})
        )
        deadline = time.monotonic() + (self.send_timeout if timeout is None else timeout)
        waiting: set[asyncio.Future[Any]] = {task, disconnected}
        while True:
            done, _ = await asyncio.wait(waiting, timeout=0.25, return_when='FIRST_COMPLETED')
            if task in done:
                return task.exception() is None and not disconnected.done()
            if disconnected.done() or (sub is not None and sub.dropped) or time.monotonic() > deadline:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                if sub is not None:
                    sub.close()
                    sub.dropped = True
                return False


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message['type'] == 'http.disconnect':
            return


async def _plain(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            'type': 'http.response.start',
            'status': status,
            'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(data)).encode())]
            + (headers or []),
        }
    )
    await send({'type': 'http.response.body', 'body': data})
