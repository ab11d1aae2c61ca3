"""The proxy's upstream HTTP client (`core/proxy/upstream.py`) against scripted servers that misbehave on cue.

The proxy paths through it run against the real llama-server in test_proxy*.py; these cover what a real server
rarely does on demand: closing a kept-alive connection, dying mid-body, bodies delimited by the close, HEAD."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from core.proxy.upstream import HIGH_WATER, RETRY_PAUSES_S, Lost, Unreachable, UpstreamClient
from tests.conftest import free_port, wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A TCP server whose handler gets (reader, writer, connection number)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self.errors: list[BaseException] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            self.errors.append(e)
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b'\r\n\r\n')
        length = 0
        for line in head.split(b'\r\n'):
            if line.lower().startswith(b'content-length:'):
                length = int(line.split(b':')[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Scripted]:
    s = Scripted(handler)
    s.port = free_port()
    server = await asyncio.start_server(s._serve, '127.0.0.1', s.port)
    try:
        yield s
    finally:
        server.close()
        await server.wait_closed()


def ok(body: bytes, extra: bytes = b'') -> bytes:
    return b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s' % (
        len(body),
        extra,
        body,
    )


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(connect_timeout=5)
    yield c
    await c.close()


async def test_keeps_the_connection_alive_and_sends_what_it_was_given(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            req = await s.read_request(reader)
            writer.write(ok(b'{"n": %d, "len": %d}' % (n, len(req))))
            await writer.drain()

    async with scripted(handler) as s:
        for i in range(3):
            body = b'{"model": "m", "i": %d}' % i
            resp = await client.request('POST', '127.0.0.1', s.port, '/v1/embeddings?x=1', [(b'x-trace', b'abc')], body)
            assert resp.status == 200
            assert resp.content_type == b'application/json'
            assert await resp.read() == b'{"n": 1, "len": %d}' % len(s.requests[-1])
            resp.release()
        assert s.connections == 1
        head, _, sent = s.requests[0].partition(b'\r\n\r\n')
        lines = head.split(b'\r\n')
        assert lines[0] == b'POST /v1/embeddings?x=1 HTTP/1.1'
        assert f'host: 127.0.0.1:{s.port}'.encode() in lines
        assert b'x-trace: abc' in lines and b'content-length: %d' % len(sent) in lines
        assert sent == b'{"model": "m", "i": 0}'


async def test_a_response_that_says_close_is_not_reused(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(ok(b'{}', b'connection: close\r\n'))
        await writer.drain()

    async with scripted(handler) as s:
        for _ in range(2):
            resp = await client.request('GET', '127.0.0.1', s.port, '/props')
            assert await resp.read() == b'{}'
            resp.release()
        assert s.connections == 2
        assert b'content-length' not in s.requests[0]  # a GET without a body says nothing about one


async def test_a_kept_alive_connection_the_server_dropped_is_retried_on_a_new_one(client: UpstreamClient) -> None:
    # Each connection answers one request, then closes when the next one arrives, unanswered: what a server that
    # timed out an idle keep-alive connection looks like from the client's side, at the worst moment.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(ok(b'{"conn": %d}' % n))
        await writer.drain()
        await reader.readuntil(b'\r\n\r\n')

    async with scripted(handler) as s:
        answers = []
        for _ in range(3):
            resp = await client.request('POST', '127.0.0.1', s.port, '/v1/embeddings', body=b'{}')
            answers.append(await resp.read())
            resp.release()
        assert answers == [b'{"conn": 1}', b'{"conn": 2}', b'{"conn": 3}']


async def test_a_busy_server_dropping_new_connections_unanswered_is_tried_again(client: UpstreamClient) -> None:
    # llama-server closes connections it has no HTTP thread for, without reading them.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n >= 3:
            await s.read_request(reader)
            writer.write(ok(b'{"conn": %d}' % n))
            await writer.drain()

    async with scripted(handler) as s:
        resp = await client.request('POST', '127.0.0.1', s.port, '/v1/chat/completions', body=b'{}')
        assert await resp.read() == b'{"conn": 3}'
        resp.release()


async def test_a_server_that_never_answers_is_unreachable_after_a_few_tries(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)

    async with scripted(handler) as s:
        with pytest.raises(Unreachable, match='before answering'):
            await client.request('POST', '127.0.0.1', s.port, '/v1/chat/completions', body=b'{}')
        assert s.connections == 1 + len(RETRY_PAUSES_S)


async def test_refused_connection_is_unreachable(client: UpstreamClient) -> None:
    with pytest.raises(Unreachable, match='cannot connect'):
        await client.request('GET', '127.0.0.1', free_port(), '/health')


async def test_chunks_are_handed_on_as_they_arrive(client: UpstreamClient) -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n')
        writer.write(b'8\r\ndata: 1\n\r\n')
        await writer.drain()
        await go_on.wait()
        writer.write(b'8\r\ndata: 2\n\r\n0\r\n\r\n')
        await writer.drain()

    async with scripted(handler) as s:
        resp = await client.request('POST', '127.0.0.1', s.port, '/v1/chat/completions', body=b'{}')
        assert resp.content_type.startswith(b'text/event-stream')
        assert await asyncio.wait_for(resp.chunk(), 5) == b'data: 1\n'  # before the server sent the rest
        go_on.set()
        assert await resp.chunk() == b'data: 2\n'
        assert await resp.chunk() == b''
        assert resp.complete
        resp.release()
        assert client.idle_count('127.0.0.1', s.port) == 0  # llama-server closes it after a stream


async def test_a_body_delimited_by_the_close_is_complete(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it')
        await writer.drain()

    async with scripted(handler) as s:
        resp = await client.request('GET', '127.0.0.1', s.port, '/metrics')
        assert await resp.read() == b'all of it'
        assert resp.complete
        resp.release()
        assert client.idle_count('127.0.0.1', s.port) == 0


async def test_death_mid_body_is_lost_not_an_end(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n')
        await writer.drain()

    async with scripted(handler) as s:
        resp = await client.request('POST', '127.0.0.1', s.port, '/v1/chat/completions', body=b'{}')
        assert await resp.chunk() == b'data: 1\n'
        with pytest.raises(Lost, match='mid-response'):
            await resp.chunk()
        resp.abort()


async def test_malformed_response_is_lost(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n')
        await writer.drain()
        await reader.read()

    async with scripted(handler) as s:
        with pytest.raises(Lost, match='malformed'):
            await client.request('GET', '127.0.0.1', s.port, '/props')


async def test_head_has_no_body(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n')
        await writer.drain()
        await reader.read()

    async with scripted(handler) as s:
        resp = await client.request('HEAD', '127.0.0.1', s.port, '/props')
        assert resp.status == 200 and await resp.read() == b''
        resp.release()


async def test_a_slow_reader_pauses_the_upstream(client: UpstreamClient) -> None:
    total = 16 * HIGH_WATER
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal sent
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n' % total)
        block = b'x' * 65536
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)

    async with scripted(handler) as s:
        resp = await client.request('GET', '127.0.0.1', s.port, '/big')
        conn = resp._conn
        await wait_for(lambda: conn.paused, 10)  # the client stopped reading the socket
        assert resp._buffered < 2 * HIGH_WATER
        assert sent < total  # the server is held back (16 MiB is more than loopback's socket buffers)
        body = await resp.read()
        assert len(body) == total and sent == total
        resp.release()


async def test_abort_resets_the_connection(client: UpstreamClient) -> None:
    seen: list[BaseException | bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n')
        await writer.drain()
        try:
            seen.append(await reader.read())
        except ConnectionResetError as e:
            seen.append(e)

    async with scripted(handler) as s:
        resp = await client.request('POST', '127.0.0.1', s.port, '/v1/chat/completions', body=b'{}')
        assert await resp.chunk() == b'data: 1\n'
        resp.abort()
        await wait_for(lambda: seen, 5)
        assert isinstance(seen[0], ConnectionResetError)  # a reset, not a polite FIN


async def test_an_event_stream_read_whole_goes_to_the_sink_as_it_arrives(client: UpstreamClient) -> None:
    go_on = asyncio.Event()
    pieces: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await s.read_request(reader)
        if n == 1:  # headers and the first event in one write, then the rest later
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n')
            writer.write(b'8\r\ndata: 1\n\r\n')
            await writer.drain()
            await go_on.wait()
            writer.write(b'8\r\ndata: 2\n\r\n0\r\n\r\n')
        elif n == 2:  # an error is not an event stream: returned at its headers, read as usual
            writer.write(b'HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}')
        else:  # dies mid-stream
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n')
            writer.write(b'8\r\ndata: 1\n\r\n')
        await writer.drain()

    async with scripted(handler) as s:
        call = asyncio.create_task(
            client.request('POST', '127.0.0.1', s.port, '/v1/completions', body=b'{}', sse_sink=pieces.append)
        )
        await wait_for(lambda: pieces, 5)
        assert pieces == [b'data: 1\n'] and not call.done()  # fed before the stream ended
        go_on.set()
        resp = await call
        assert resp.sink is not None and resp.complete and pieces == [b'data: 1\n', b'data: 2\n']
        assert await resp.read() == b''
        resp.release()

        pieces.clear()
        resp = await client.request('POST', '127.0.0.1', s.port, '/v1/completions', body=b'{}', sse_sink=pieces.append)
        assert resp.status == 400 and resp.sink is None and await resp.read() == b'{}' and pieces == []
        resp.release()

        with pytest.raises(Lost, match='mid-response'):
            await client.request('POST', '127.0.0.1', s.port, '/v1/completions', body=b'{}', sse_sink=pieces.append)


async def test_keeps_no_more_idle_connections_than_the_server_has_slots(client: UpstreamClient) -> None:
    # llama-server serves each kept-alive connection on its own thread (-np + 2): a pool holding more idle ones than
    # slots would leave none for its health check.
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await s.read_request(reader)
            await release.wait()
            writer.write(ok(b'{}'))
            await writer.drain()

    async with scripted(handler) as s:
        calls = [
            asyncio.create_task(client.request('POST', '127.0.0.1', s.port, '/v1/embeddings', body=b'{}', max_idle=2))
            for _ in range(4)
        ]
        await wait_for(lambda: len(s.requests) == 4, 5)
        assert s.connections == 4  # all four in flight at once, each on its own connection
        release.set()
        for resp in await asyncio.gather(*calls):
            assert await resp.read() == b'{}'
            resp.release()
        assert client.idle_count('127.0.0.1', s.port) == 2
        resp = await client.request('POST', '127.0.0.1', s.port, '/v1/embeddings', body=b'{}', max_idle=2)
        await resp.read()
        resp.release()
        assert s.connections == 4  # reused one
