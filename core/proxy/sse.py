"""Reading llama-server's answers: token counts and speeds from `timings`/`usage`, and whole responses assembled
from a stream (the proxy streams from upstream even for non-streaming clients, so a disconnect frees the slot)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from core.proxy import jsonio


def sse_payloads(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects on the `data:` lines of an SSE text (unparseable lines and `[DONE]` skipped)."""
    out = []
    for line in data.split(b'\n'):
        if not line.startswith(b'data:'):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b'{'):
            continue
        try:
            obj = jsonio.loads(payload)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def usage_payloads(data: bytes) -> list[dict[str, Any]]:
    """Like `sse_payloads`, but decodes only the events that can carry `timings`/`usage` (a fast stream's tail
    holds many token chunks; decoding them all cost a fifth of the proxy's CPU on 32 concurrent streams)."""
    lines = [line for line in data.split(b'\n') if b'"usage"' in line or b'"timings"' in line]
    return sse_payloads(b'\n'.join(lines)) if lines else []


_USAGE_KEYS = ('usage', 'timings')
_DECODER = json.JSONDecoder()


def json_usage(body: bytes) -> list[dict[str, Any]]:
    """The `usage` / `timings` objects of a JSON response, decoded on their own: an embeddings reply is mostly
    vectors, and decoding all of it to read a few counters would cost more than relaying it. Only the bytes from
    each key on are decoded (llama-server writes them last)."""
    found: dict[str, Any] = {}
    for key in _USAGE_KEYS:
        at = body.rfind(b'"%s"' % key.encode())
        if at < 0:
            continue
        start = body.find(b'{', at, at + len(key) + 16)  # `"usage": {`
        if start < 0:
            continue
        try:
            value, _ = _DECODER.raw_decode(body[start:].decode())
        except ValueError:  # UnicodeDecodeError is one
            continue
        if isinstance(value, dict):
            found[key] = value
    return [found] if found else []


def usage_stats(objs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Prompt/cached/completion tokens and tokens/s from the last `timings` and `usage` seen (OpenAI, Anthropic
    and llama-server native shapes)."""
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    for obj in objs:
        if isinstance(obj.get('timings'), dict):
            timings = obj['timings']
        for holder in (obj, obj.get('message'), obj.get('response')):  # Anthropic / Responses nest it
            if isinstance(holder, dict) and isinstance(holder.get('usage'), dict):
                usage = {**(usage or {}), **holder['usage']}
    out: dict[str, Any] = {}
    if usage:
        details = usage.get('prompt_tokens_details') or usage.get('input_tokens_details') or {}
        out['prompt_tokens'] = _first_int(usage, 'prompt_tokens', 'input_tokens')
        out['completion_tokens'] = _first_int(usage, 'completion_tokens', 'output_tokens')
        out['cached_tokens'] = _first_int(details, 'cached_tokens') if isinstance(details, dict) else None
        if out['cached_tokens'] is None:
            out['cached_tokens'] = _first_int(usage, 'cache_read_input_tokens')
    if timings:
        prompt_n, cache_n = _first_int(timings, 'prompt_n'), _first_int(timings, 'cache_n')
        if out.get('prompt_tokens') is None and prompt_n is not None:
            out['prompt_tokens'] = prompt_n + (cache_n or 0)
        if out.get('cached_tokens') is None:
            out['cached_tokens'] = cache_n
        if out.get('completion_tokens') is None:
            out['completion_tokens'] = _first_int(timings, 'predicted_n')
        out['prompt_tps'] = _round(timings.get('prompt_per_second'))
        out['gen_tps'] = _round(timings.get('predicted_per_second'))
    return {k: v for k, v in out.items() if v is not None}


def _first_int(d: dict[str, Any], *names: str) -> int | None:
    for n in names:
        v = d.get(n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _round(v: Any) -> float | None:
    return round(float(v), 2) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class SSEObjects:
    """Incremental `data:` JSON parser for assembling; tolerates events split across network chunks."""

    def __init__(self) -> None:
        self._buf = b''

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buf += chunk
        cut = self._buf.rfind(b'\n')
        if cut < 0:
            return []
        complete, self._buf = self._buf[: cut + 1], self._buf[cut + 1 :]
        return sse_payloads(complete)

    def close(self) -> list[dict[str, Any]]:
        rest, self._buf = self._buf, b''
        return sse_payloads(rest)


class Assembler:
    """Builds the non-streaming response from the stream's chunks. `kind`: chat, text (OpenAI completions) or
    native (llama-server /completion and /infill)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.outputs = 0  # progress-free chunks seen
        self.usage_objs: list[dict[str, Any]] = []  # those carrying `usage` or `timings`, for `usage_stats`
        self.last: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.content: list[str] = []
        self.error: dict[str, Any] | None = None

    def add(self, obj: dict[str, Any]) -> None:
        if 'error' in obj and isinstance(obj['error'], dict):
            self.error = obj
            return
        if 'prompt_progress' in obj and not self._has_output(obj):
            return
        self.outputs += 1
        if 'usage' in obj or 'timings' in obj:
            self.usage_objs.append(obj)
        self.last = {**self.last, **{k: v for k, v in obj.items() if k not in ('choices', 'content')}}
        if self.kind == 'native':
            if isinstance(obj.get('content'), str):
                self.content.append(obj['content'])
            return
        for ch in obj.get('choices') or []:
            self._add_choice(ch)

    def _has_output(self, obj: dict[str, Any]) -> bool:
        if self.kind == 'native':
            return bool(obj.get('content')) or bool(obj.get('stop'))
        for ch in obj.get('choices') or []:
            delta = ch.get('delta') or {}
            if ch.get('finish_reason') or ch.get('text') or delta.get('content') or delta.get('tool_calls'):
                return True
            if delta.get('reasoning_content'):
                return True
        return False

    def _add_choice(self, ch: dict[str, Any]) -> None:
        idx = ch.get('index', 0)
        acc = self.choices.setdefault(idx, {'index': idx, 'parts': {}, 'tool_calls': {}, 'finish_reason': None})
        if ch.get('finish_reason') is not None:
            acc['finish_reason'] = ch['finish_reason']
        lp = ch.get('logprobs')
        if isinstance(lp, dict):
            for key, val in lp.items():
                if isinstance(val, list):
                    acc.setdefault('logprobs', {}).setdefault(key, []).extend(val)
        if self.kind == 'text':
            if isinstance(ch.get('text'), str):
                acc['parts'].setdefault('text', []).append(ch['text'])
            return
        delta = ch.get('delta') or {}
        if delta.get('role'):
            acc['role'] = delta['role']
        for field in ('content', 'reasoning_content'):
            if isinstance(delta.get(field), str):
                acc['parts'].setdefault(field, []).append(delta[field])
        for tc in delta.get('tool_calls') or []:
            slot = acc['tool_calls'].setdefault(
                tc.get('index', 0), {'id': None, 'type': 'function', 'function': {'name': '', 'arguments': ''}}
            )
            if tc.get('id'):
                slot['id'] = tc['id']
            if tc.get('type'):
                slot['type'] = tc['type']
            fn = tc.get('function') or {}
            slot['function']['name'] += fn.get('name') or ''
            slot['function']['arguments'] += fn.get('arguments') or ''

    def result(self) -> dict[str, Any]:
        if self.kind == 'native':
            return {**self.last, 'content': ''.join(self.content)}
        base = {k: v for k, v in self.last.items() if k not in ('prompt_progress',)}
        base['object'] = 'chat.completion' if self.kind == 'chat' else 'text_completion'
        base.setdefault('created', int(time.time()))
        choices = []
        for idx in sorted(self.choices):
            acc = self.choices[idx]
            parts = acc['parts']
            out: dict[str, Any] = {'index': idx, 'finish_reason': acc['finish_reason']}
            if self.kind == 'text':
                out['text'] = ''.join(parts.get('text', []))
            else:
                message: dict[str, Any] = {'role': acc.get('role', 'assistant'), 'content': None}
                if 'content' in parts:
                    message['content'] = ''.join(parts['content'])
                if 'reasoning_content' in parts:
                    message['reasoning_content'] = ''.join(parts['reasoning_content'])
                if acc['tool_calls']:
                    message['tool_calls'] = [acc['tool_calls'][i] for i in sorted(acc['tool_calls'])]
                out['message'] = message
            out['logprobs'] = acc.get('logprobs')
            choices.append(out)
        base['choices'] = choices
        return base
