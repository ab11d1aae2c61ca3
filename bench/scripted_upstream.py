"""A fast scripted llama-server for `bench/proxy_overhead.py`, so the proxy's own cost dominates what is measured.

Set as `llama_server_path` (through a small shell wrapper naming this venv's Python), it stands in for llama-server
for models whose file name starts with `scripted`; for every other model, and for `--version` / `--help`, it
execs the real llama-server named by $BENCH_REAL_LLAMA_SERVER with the same argv (same pid, so the supervisor
manages both alike). The scripted server answers at once, from memory:

- `POST /v1/chat/completions`: a fixed chat completion; with `"stream": true`, an SSE stream of `max_tokens`
  content chunks (each its own write, shaped like llama-server's) plus the final chunk with `timings`/`usage`.
- `POST /v1/embeddings`: a fixed 64-float embedding (a plain JSON relay for the proxy).
- `GET /health`, `/metrics`, `/slots`: what the supervisor and the metrics sampler poll.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SCRIPTED_PREFIX = 'scripted'
CREATED = 1_700_000_000


def _chunk(i: int, model: str, content: str | None, finish: str | None = None, extra: dict | None = None) -> bytes:
    delta = {} if content is None else {'content': content}
    obj = {
        'choices': [{'finish_reason': finish, 'index': 0, 'delta': delta}],
        'created': CREATED,
        'id': 'chatcmpl-scripted',
        'model': model,
        'system_fingerprint': 'b0-scripted',
        'object': 'chat.completion.chunk',
        **(extra or {}),
    }
    return b'data: ' + json.dumps(obj, separators=(',', ':')).encode() + b'\n\n'


def _final_extra(n: int) -> dict:
    return {
        'usage': {'completion_tokens': n, 'prompt_tokens': 8, 'total_tokens': n + 8},
        'timings': {
            'cache_n': 0,
            'prompt_n': 8,
            'prompt_ms': 1.0,
            'prompt_per_second': 8000.0,
            'predicted_n': n,
            'predicted_ms': 1.0,
            'predicted_per_second': 1000.0 * n,
        },
    }


def serve(port: int, model: str) -> None:
    from aiohttp import web

    words = [f' tok{i}' for i in range(4096)]
    embedding = json.dumps(
        {
            'object': 'list',
            'model': model,
            'data': [{'object': 'embedding', 'index': 0, 'embedding': [round(i / 64, 6) for i in range(64)]}],
            'usage': {'prompt_tokens': 8, 'total_tokens': 8},
        }
    ).encode()

    def completion(n: int) -> bytes:
        return json.dumps(
            {
                'choices': [
                    {
                        'finish_reason': 'length',
                        'index': 0,
                        'message': {'role': 'assistant', 'content': ''.join(words[:n])},
                    }
                ],
                'created': CREATED,
                'model': model,
                'system_fingerprint': 'b0-scripted',
                'object': 'chat.completion',
                'id': 'chatcmpl-scripted',
                **_final_extra(n),
            }
        ).encode()

    async def health(_: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type='application/json')

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text='', content_type='text/plain')

    async def slots(_: web.Request) -> web.Response:
        return web.Response(body=b'[]', content_type='application/json')

    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=embedding, content_type='application/json')

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = max(1, min(int(body.get('max_tokens') or 16), len(words)))
        if not body.get('stream'):
            return web.Response(body=completion(n), content_type='application/json')
        resp = web.StreamResponse(headers={'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache'})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(_chunk(i, model, words[i]))
        await resp.write(_chunk(n, model, None, 'length', _final_extra(n)))
        await resp.write(b'data: [DONE]\n\n')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get('/health', health)
    app.router.add_get('/metrics', metrics)
    app.router.add_get('/slots', slots)
    app.router.add_post('/v1/embeddings', embeddings)
    app.router.add_post('/v1/chat/completions', chat)
    print(f'main: server is listening on http://127.0.0.1:{port} (scripted)', file=sys.stderr, flush=True)
    web.run_app(app, host='127.0.0.1', port=port, print=None, access_log=None, handle_signals=True)


def main() -> None:
    argv = sys.argv[1:]
    model = argv[argv.index('--model') + 1] if '--model' in argv else ''
    if not Path(model).name.startswith(SCRIPTED_PREFIX):
        real = os.environ['BENCH_REAL_LLAMA_SERVER']
        os.execv(real, [real, *argv])
    serve(int(argv[argv.index('--port') + 1]), Path(model).stem)


if __name__ == '__main__':
    main()
