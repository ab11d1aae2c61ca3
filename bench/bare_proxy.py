"""The cheapest proxy this Python can be: a ceiling for what the app's data path could reach, not a product part.

    .venv/bin/python bench/bare_proxy.py LISTEN_PORT UPSTREAM_PORT

One process on uvloop, asyncio protocols and httptools, no task per request: a client request is parsed in the
protocol's callbacks, written to an idle kept-alive upstream connection (one opened when none is idle) and the
answer written back as it is parsed; no routing, no guards, no bookkeeping, no logs. `bench/proxy_overhead.py
--bare` runs it beside the app and nginx, so a ratio the app misses can be read against what any Python proxy gets
on the same machine in the same run.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

HOP = {b'connection', b'keep-alive', b'transfer-encoding', b'content-length'}


class Upstream(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None
        self.head: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)
        if self.client is not None:
            self.client.up = None
            self.client.failed()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.head = [b'HTTP/1.1 %d OK\r\n' % self.parser.get_status_code()]
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b'transfer-encoding':
            self.chunked = True
        elif low == b'content-length' or low not in HOP:
            self.head.append(name + b': ' + value + b'\r\n')

    def on_headers_complete(self) -> None:
        assert self.client is not None
        self.head.append(b'transfer-encoding: chunked\r\n\r\n' if self.chunked else b'\r\n')
        self.client.write(b''.join(self.head))

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        self.client.write(b'%x\r\n%s\r\n' % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        assert client is not None
        client.up = None
        if self.chunked:
            client.write(b'0\r\n\r\n')
        if not client.closed:
            self.pool.idle.append(self)
            client.done()


class Pool:
    def __init__(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.loop, self.port = loop, port
        self.idle: list[Upstream] = []

    def lost(self, up: Upstream) -> None:
        if up in self.idle:
            self.idle.remove(up)

    def send(self, client: Client, data: bytes) -> None:
        if self.idle:
            up = self.idle.pop()
            up.client, client.up = client, up
            assert up.transport is not None
            up.transport.write(data)
            return
        fut = self.loop.create_connection(lambda: Upstream(self), '127.0.0.1', self.port)

        def opened(f: asyncio.Future) -> None:
            if f.exception() is not None:
                client.failed()
                return
            _, up = f.result()
            up.client, client.up = client, up
            up.transport.write(data)

        asyncio.ensure_future(fut).add_done_callback(opened)


class Client(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.up: Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP:
            self.headers.append(name + b': ' + value + b'\r\n')

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b''.join(self.body)
        method = self.parser.get_method()
        head = b'%s %s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n' % (method, self.url, b''.join(self.headers), len(body))
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.pool.send(self, head + body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()  # the answer has nowhere to go: llama-server stops the task

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def done(self) -> None:
        self.transport.resume_reading()  # type: ignore[union-attr]

    def failed(self) -> None:
        self.closed = True
        self.transport.close()  # type: ignore[union-attr]


async def serve(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(loop, upstream)
    server = await loop.create_server(lambda: Client(pool), '127.0.0.1', listen)
    async with server:
        await server.serve_forever()


if __name__ == '__main__':
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
