"""llama-server's answers in Ollama's shape: a `Reply` the proxy writes to as it would to an OpenAI client.

The proxy's path (`core/proxy/service.py`) relays llama-server's event stream piece by piece; this reply turns
each event into Ollama's NDJSON (one object per line, written as soon as its event is complete: nothing is held
back for a later write), or, for `stream: false`, keeps them and answers one object at the end. Errors become
`{"error": "..."}`, with the status before the first byte and as the last line after it.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from core.proxy import jsonio
from core.proxy.asgi import Reply
from core.proxy.errors import ProxyError
from core.proxy.sse import Assembler, SSEObjects

NDJSON = b'application/x-ndjson'
DONE_REASONS = {'stop': 'stop', 'length': 'length', 'tool_calls': 'stop'}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace('+00:00', 'Z')


class OllamaReply(Reply):
    """`kind`: chat, generate (through the chat template), generate_raw (a text completion), embed, embeddings."""

    __slots__ = (
        '_asm',
        '_parser',
        '_plain',
        '_up_sse',
        '_up_status',
        'client_stream',
        'failed',
        'kind',
        'load_ns',
        'model',
        't0',
        'think',
    )

    def __init__(self, send: Any, kind: str, model: str, client_stream: bool, think: Any = None) -> None:
        super().__init__(send)
        self.kind, self.model, self.client_stream, self.think = kind, model, client_stream, think
        self.t0 = time.perf_counter()
        self.load_ns = 0  # set when the model is leased: the wait for it to start
        self._up_status, self._up_sse = 0, False
        self._parser = SSEObjects()
        self._asm = Assembler('text' if kind == 'generate_raw' else 'chat')
        self._plain: list[bytes] = []
        self.failed: ProxyError | None = None  # the error the client was told, if any

    # ---- what the proxy calls --------------------------------------------------------------------------
    async def start(self, status: int, headers: list[tuple[bytes, bytes]], sse: bool = False) -> None:
        self._up_status, self._up_sse = status, sse
        if sse and status < 400 and self.client_stream:
            await Reply.start(self, 200, [(b'content-type', NDJSON)])

    async def body(self, data: bytes, more: bool = True) -> None:
        if not (self._up_sse and self._up_status < 400):
            self._plain.append(data)
            if not more:
                await self._finish_plain(b''.join(self._plain))
            return
        lines = [line for obj in self._parser.feed(data) for line in self._take(obj)]
        if not more:
            lines += [line for obj in self._parser.close() for line in self._take(obj)]
        if self._asm.error is not None and not more:
            await self.error(_stream_error(self._asm.error))
            return
        if not self.client_stream:
            if not more:
                await self.json(200, self._whole())
            return
        if not more:
            lines += self._closing_lines()
        if lines or not more:
            await Reply.body(self, b''.join(lines), more)

    async def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = jsonio.dumps(obj)
        hdrs = [(b'content-type', b'application/json'), (b'content-length', str(len(data)).encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await Reply.start(self, status, hdrs)
        await Reply.body(self, data, more=False)

    async def error(self, err: ProxyError) -> None:
        if self.ended:  # the answer was complete; nothing can follow it
            return
        self.failed = err
        message = {'error': err.message}
        if not self.started:
            await self.json(err.status, message, err.headers)
        else:
            await Reply.body(self, jsonio.dumps(message) + b'\n', more=False)

    # ---- building Ollama's objects -----------------------------------------------------------------------
    def _take(self, obj: dict[str, Any]) -> list[bytes]:
        """One upstream event: accumulated, and for a streaming client its text as NDJSON lines."""
        self._asm.add(obj)
        if not self.client_stream or 'error' in obj:
            return []
        lines = []
        for ch in obj.get('choices') or []:
            if ch.get('index', 0) != 0:
                continue
            if self.kind == 'generate_raw':
                text, thinking = ch.get('text'), None
            else:
                delta = ch.get('delta') or {}
                text, thinking = delta.get('content'), delta.get('reasoning_content')
            if thinking and self.think is not False:
                lines.append(self._line(self._piece('', thinking), done=False))
            if text:
                lines.append(self._line(self._piece(text, None), done=False))
        return lines

    def _closing_lines(self) -> list[bytes]:
        out = []
        calls = self._tool_calls()
        if calls:  # Ollama sends a call whole, in one chunk, not argument fragments
            out.append(self._line({'message': {'role': 'assistant', 'content': '', 'tool_calls': calls}}, done=False))
        out.append(self._line({**self._piece('', None), **self._stats()}, done=True))
        return out

    def _whole(self) -> dict[str, Any]:
        acc = self._asm.choices.get(0, {'parts': {}, 'tool_calls': {}})
        parts = acc['parts']
        text = ''.join(parts.get('text' if self.kind == 'generate_raw' else 'content', []))
        thinking = ''.join(parts.get('reasoning_content', [])) if self.think is not False else ''
        piece = self._piece(text, thinking or None)
        calls = self._tool_calls()
        if calls and 'message' in piece:
            piece['message']['tool_calls'] = calls
        return {'model': self.model, 'created_at': now_iso(), **piece, 'done': True, **self._stats()}

    def _piece(self, text: str, thinking: str | None) -> dict[str, Any]:
        if self.kind == 'chat':
            message: dict[str, Any] = {'role': 'assistant', 'content': text}
            if thinking:
                message['thinking'] = thinking
            return {'message': message}
        out: dict[str, Any] = {'response': text}
        if thinking:
            out['thinking'] = thinking
        return out

    def _line(self, fields: dict[str, Any], done: bool) -> bytes:
        return jsonio.dumps({'model': self.model, 'created_at': now_iso(), **fields, 'done': done}) + b'\n'

    def _tool_calls(self) -> list[dict[str, Any]]:
        acc = self._asm.choices.get(0)
        if not acc or not acc['tool_calls']:
            return []
        out = []
        for i in sorted(acc['tool_calls']):
            fn = acc['tool_calls'][i]['function']
            out.append({'function': {'index': i, 'name': fn['name'], 'arguments': _arguments(fn['arguments'])}})
        return out

    def _stats(self) -> dict[str, Any]:
        """Ollama's counters from llama-server's own `timings` and `usage` (durations in nanoseconds)."""
        timings: dict[str, Any] = {}
        usage: dict[str, Any] = {}
        for obj in self._asm.usage_objs:
            if isinstance(obj.get('timings'), dict):
                timings = obj['timings']
            if isinstance(obj.get('usage'), dict):
                usage = obj['usage']
        finish = next((c.get('finish_reason') for c in self._asm.choices.values() if c.get('finish_reason')), None)
        out: dict[str, Any] = {
            'done_reason': DONE_REASONS.get(finish or 'stop', finish or 'stop'),
            'total_duration': int((time.perf_counter() - self.t0) * 1e9),
            'load_duration': self.load_ns,
        }
        prompt_n = usage.get('prompt_tokens', timings.get('prompt_n'))
        eval_n = usage.get('completion_tokens', timings.get('predicted_n'))
        if isinstance(prompt_n, int):
            out['prompt_eval_count'] = prompt_n
        if isinstance(timings.get('prompt_ms'), (int, float)):
            out['prompt_eval_duration'] = int(timings['prompt_ms'] * 1e6)
        if isinstance(eval_n, int):
            out['eval_count'] = eval_n
        if isinstance(timings.get('predicted_ms'), (int, float)):
            out['eval_duration'] = int(timings['predicted_ms'] * 1e6)
        return out

    async def _finish_plain(self, raw: bytes) -> None:
        """A JSON answer: embeddings, or llama-server's error (any route)."""
        try:
            obj = jsonio.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            obj = {}
        if self._up_status == 501 and self.kind in ('embed', 'embeddings'):  # llama-server without --embeddings
            message = f"{self.model} does not serve embeddings: turn on 'embeddings' in its parameters (Models page)"
            await self.error(ProxyError(400, message, 'invalid_request_error'))
            return
        if self._up_status >= 400 or not isinstance(obj, dict):
            await self.error(ProxyError(self._up_status or 502, _message_of(obj, raw), 'upstream_error'))
            return
        if self.kind not in ('embed', 'embeddings') or not isinstance(obj.get('data'), list):
            await self.error(ProxyError(502, 'llama-server sent an answer this route cannot use', 'upstream_error'))
            return
        vectors = [d.get('embedding') for d in sorted(obj['data'], key=lambda d: d.get('index', 0))]
        if self.kind == 'embeddings':
            await self.json(200, {'embedding': vectors[0] if vectors else []})
            return
        usage = obj['usage'] if isinstance(obj.get('usage'), dict) else {}
        await self.json(
            200,
            {
                'model': self.model,
                'embeddings': vectors,
                'total_duration': int((time.perf_counter() - self.t0) * 1e9),
                'load_duration': self.load_ns,
                'prompt_eval_count': usage.get('prompt_tokens'),
            },
        )


def _arguments(raw: str) -> dict[str, Any]:
    """Ollama gives a call's arguments as an object; llama-server as the JSON text of one."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {'arguments': raw}  # not JSON: kept as text rather than lost
    return value if isinstance(value, dict) else {'arguments': value}


def _stream_error(obj: dict[str, Any]) -> ProxyError:
    err = obj.get('error') or {}
    code = err.get('code') if isinstance(err, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    message = err.get('message') if isinstance(err, dict) else None
    return ProxyError(status, str(message or err or 'llama-server error'), 'upstream_error')


def _message_of(obj: Any, raw: bytes) -> str:
    err = obj.get('error') if isinstance(obj, dict) else None
    if isinstance(err, dict) and err.get('message'):
        return str(err['message'])
    if isinstance(err, str):
        return err
    return raw[:300].decode('utf-8', 'replace') or 'llama-server sent no answer'
