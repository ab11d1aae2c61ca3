"""A scripted OpenAI-compatible server (a stand-in for vLLM or a hosted API) for the remote-upstream tests: it
wants its own bearer key, lists its models, answers chat (plain or streamed, one chunk every `chunk_delay_s`) and
embeddings, and records what it was sent and when a stream's client went away. `stop()` and `start()` again on
the same port make it go down and come back."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import free_port


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    key: str = 'upstream-secret'
    models: list[str] = field(default_factory=lambda: ['gpt-fake', 'embed-fake'])
    chunks: int = 5
    chunk_delay_s: float = 0.0
    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    disconnects: int = 0
    model_lists: int = 0
    tls: ssl.SSLContext | None = None  # serve HTTPS with this context
    refuse: int | None = None  # answer every chat with this status (a full or failing server)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f'{"https" if self.tls else "http"}://127.0.0.1:{self.port}/v1'

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_get('/v1/models', self._models)
        app.router.add_post('/v1/chat/completions', self._chat)
        app.router.add_post('/v1/embeddings', self._embeddings)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, '127.0.0.1', self.port, reuse_address=True, ssl_context=self.tls).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get('Authorization') == f'Bearer {self.key}'

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({'error': {'message': 'bad key'}}, status=401)
        self.model_lists += 1
        data = [{'id': m, 'object': 'model', 'owned_by': 'fake'} for m in self.models]
        return web.json_response({'object': 'list', 'data': data})

    async def _record(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not self._authorized(request):
            return web.json_response({'error': {'message': 'bad key', 'type': 'auth'}}, status=401)
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        if self.refuse is not None:
            return web.json_response({'error': {'message': f'refused with {self.refuse}'}}, status=self.refuse)
        if body.get('model') not in self.models:
            return web.json_response({'error': {'message': f'no model {body.get("model")}'}}, status=404)
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if isinstance(body, web.Response):
            return body
        words = [f'w{i} ' for i in range(self.chunks)]
        usage = {'prompt_tokens': 3, 'completion_tokens': len(words), 'total_tokens': 3 + len(words)}
        if not body.get('stream'):
            await asyncio.sleep(self.chunk_delay_s * len(words))
            message = {'role': 'assistant', 'content': ''.join(words)}
            return web.json_response(
                {
                    'id': 'chatcmpl-fake',
                    'object': 'chat.completion',
                    'created': int(time.time()),
                    'model': body['model'],
                    'choices': [{'index': 0, 'message': message, 'finish_reason': 'stop'}],
                    'usage': usage,
                }
            )
        resp = web.StreamResponse(headers={'Content-Type': 'text/event-stream'})
        await resp.prepare(request)
        try:
            for word in words:
                await asyncio.sleep(self.chunk_delay_s)
                chunk = {
                    'object': 'chat.completion.chunk',
                    'model': body['model'],
                    'choices': [{'index': 0, 'delta': {'content': word}, 'finish_reason': None}],
                }
                await resp.write(f'data: {json.dumps(chunk)}\n\n'.encode())
            last = {'object': 'chat.completion.chunk', 'model': body['model'], 'choices': [], 'usage': usage}
            await resp.write(f'data: {json.dumps(last)}\n\ndata: [DONE]\n\n'.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response(
            {
                'object': 'list',
                'data': [{'object': 'embedding', 'index': 0, 'embedding': [0.25, -0.5, 1.0]}],
                'model': body['model'],
                'usage': {'prompt_tokens': 2, 'total_tokens': 2},
            }
        )
