"""In-process publish/subscribe: the one way core services tell pages and SSE clients what changed.

Topics: `models` (library and supervisor), `metrics`, `logs`, `requests`, `config`, `alerts`.
Publishing never blocks and never fails because of a subscriber: a slow queue subscriber is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

TOPICS = ('models', 'metrics', 'logs', 'requests', 'config', 'alerts', 'health', 'downloads')


class Event(NamedTuple):  # a tuple: built for every proxied request twice, and cheaper than a frozen dataclass
    topic: str
    type: str
    data: dict[str, Any]
    ts: float
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {'topic': self.topic, 'type': self.type, 'data': self.data, 'ts': self.ts, 'seq': self.seq}


class Subscription:
    """A callback or a bounded queue on some topics. `close()` is idempotent; use as a context manager."""

    def __init__(
        self,
        bus: EventBus,
        topics: frozenset[str] | None,
        callback: Callable[[Event], Any] | None,
        maxsize: int,
    ) -> None:
        self._bus = bus
        self.topics = topics
        self.callback = callback
        self.queue: asyncio.Queue[Event] | None = None if callback else asyncio.Queue(maxsize)
        self.dropped = False  # set when the queue overflowed: the consumer was too slow and is cut off
        self.closed = False

    def wants(self, topic: str) -> bool:
        return self.topics is None or topic in self.topics

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._remove(self)

    async def get(self) -> Event:
        """Next event for a queue subscription; raises `ConnectionAbortedError` once dropped."""
        assert self.queue is not None, 'get() is for queue subscriptions'
        if self.dropped and self.queue.empty():
            raise ConnectionAbortedError('subscriber too slow; dropped')
        return await self.queue.get()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lock = threading.Lock()
        self._wanted: dict[str, bool] = {}  # topic -> whether a subscriber takes it (cleared as they come and go)

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the loop (called on its thread) so that publishes from worker threads are delivered on it."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def subscribe(self, topics: Iterable[str] | None, callback: Callable[[Event], Any]) -> Subscription:
        """Call `callback(event)` on the loop for each event; coroutine callbacks are scheduled as tasks."""
        return self._add(Subscription(self, _topics(topics), callback, 0))

    def queue(self, topics: Iterable[str] | None, maxsize: int = 1000) -> Subscription:
        """A bounded queue of events; if it fills up the subscription is dropped instead of growing."""
        return self._add(Subscription(self, _topics(topics), None, maxsize))

    def wanted(self, topic: str) -> bool:
        """Whether any subscriber takes `topic`: a publisher can skip building an event that no one reads (a log
        line each, several per request, with no page open)."""
        hit = self._wanted.get(topic)
        if hit is None:
            with self._lock:  # (not cached from a list that a subscription changes meanwhile)
                hit = self._wanted[topic] = any(sub.wants(topic) for sub in self._subs)
        return hit

    def publish(self, topic: str, type_: str, data: dict[str, Any]) -> Event:
        event = Event(topic, type_, data, time.time(), next(self._seq))
        loop = self._loop
        # The thread, not asyncio.get_running_loop(): on Python 3.11 that is a getpid() system call, and a chat
        # request publishes ~10 events (llama-server's log lines, the request's record).
        if loop is not None and threading.get_ident() != self._loop_thread and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, event)
        else:
            self._deliver(event)
        return event

    def _deliver(self, event: Event) -> None:
        for sub in list(self._subs):
            if sub.closed or not sub.wants(event.topic):
                continue
            if sub.queue is not None:
                if sub.dropped:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.dropped = True
                    self._remove(sub)
                continue
            try:
                result = sub.callback(event)  # type: ignore[misc]
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    task.add_done_callback(_log_task_error)
            except Exception:
                log.exception('event subscriber failed on %s/%s', event.topic, event.type)

    def _add(self, sub: Subscription) -> Subscription:
        with self._lock:
            self._subs.append(sub)
            self._wanted.clear()
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            self._wanted.clear()


def _topics(topics: Iterable[str] | None) -> frozenset[str] | None:
    return None if topics is None else frozenset(topics)


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error('async event subscriber failed', exc_info=task.exception())
