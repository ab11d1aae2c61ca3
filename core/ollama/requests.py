"""Ollama request bodies as llama-server's OpenAI-compatible ones (pure functions; errors are ProxyErrors).

`/api/chat` and `/api/generate` become a streamed `/v1/chat/completions` (or, for `raw` prompts, `/v1/completions`):
llama-server is always asked for a stream, with usage and prompt progress, so that a client that goes away stops
the generation at its next write (see core/proxy/service.py), and the reply is built from it in Ollama's shape
(`core/ollama/replies.py`). `/api/embed` and `/api/embeddings` become `/v1/embeddings`.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any

from core.proxy import jsonio
from core.proxy.errors import ProxyError, bad_request

# Ollama `options` that llama-server takes under the same name in an OpenAI-shaped body.
SAME_NAME_OPTIONS = (
    'temperature',
    'top_p',
    'top_k',
    'min_p',
    'typical_p',
    'repeat_penalty',
    'repeat_last_n',
    'presence_penalty',
    'frequency_penalty',
    'seed',
    'mirostat',
    'mirostat_tau',
    'mirostat_eta',
)
RENAMED_OPTIONS = {'num_keep': 'n_keep'}
# Load-time options: llama-server takes them at start, from the model's parameters (the Models page), not per
# request; they are accepted and not applied.
LOAD_TIME_OPTIONS = frozenset(
    {'num_gpu', 'main_gpu', 'num_thread', 'num_batch', 'use_mmap', 'use_mlock', 'numa', 'low_vram', 'f16_kv'}
)
_DURATION = re.compile(r'^\s*-?(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+\s*$|^\s*-?\d+(?:\.\d+)?\s*$')
_DURATION_PART = re.compile(r'(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?')
MAX_KEEP_ALIVE_S = 292 * 365 * 24 * 3600.0
_UNIT_S = {'ns': 1e-9, 'us': 1e-6, 'µs': 1e-6, 'ms': 1e-3, 's': 1.0, 'm': 60.0, 'h': 3600.0, None: 1.0}
_IMAGE_KINDS = (('/9j/', 'image/jpeg'), ('iVBOR', 'image/png'), ('R0lGOD', 'image/gif'), ('UklGR', 'image/webp'))


def model_name(data: dict[str, Any]) -> Any:
    """The model a body names (`model`; older clients send `name`)."""
    return data.get('model') if data.get('model') not in (None, '') else data.get('name')


def name_candidates(name: str) -> list[str]:
    """Ollama names carry a tag (`llama3:latest`); ours may not: the name as given, then without `:latest`."""
    out = [name]
    if name.endswith(':latest'):
        out.append(name[: -len(':latest')])
    return out


def keep_alive_s(data: dict[str, Any]) -> float | None:
    """`keep_alive` in seconds (a number of seconds or a Go duration like "5m" or "1h30m"; negative: for ever),
    or None. Beyond Go's longest duration (~292 years) it is for ever, as in Ollama."""
    value = data.get('keep_alive')
    if value is None or value == '':
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond a float
            seconds = math.inf if value > 0 else -math.inf
    elif isinstance(value, str) and _DURATION.match(value):
        seconds = sum(float(n) * _UNIT_S[unit or None] for n, unit in _DURATION_PART.findall(value.strip()))
        if value.strip().startswith('-'):
            seconds = -abs(seconds)
    if seconds is None or math.isnan(seconds):
        raise bad_request(f'keep_alive {value!r} is not a duration such as "5m", "1h30m" or a number of seconds')
    return -1.0 if seconds > MAX_KEEP_ALIVE_S else seconds


def chat(data: dict[str, Any], model_id: str, ctx: int | None, vision: bool) -> dict[str, Any]:
    messages = data.get('messages')
    if not isinstance(messages, list):
        raise bad_request('"messages" must be a list')
    body: dict[str, Any] = {'model': model_id, 'messages': [_message(m, vision) for m in messages]}
    _link_tool_results(body['messages'])
    if data.get('tools'):
        if not isinstance(data['tools'], list):
            raise bad_request('"tools" must be a list')
        body['tools'] = data['tools']
    return _generation(body, data, ctx)


def generate(data: dict[str, Any], model_id: str, ctx: int | None, vision: bool) -> tuple[str, dict[str, Any]]:
    """`/api/generate`: the prompt through the model's chat template (system first), or as it is with `raw`."""
    prompt = data.get('prompt') or ''
    if not isinstance(prompt, str):
        raise bad_request('"prompt" must be a string')
    if data.get('suffix'):
        raise bad_request('"suffix" (fill-in-the-middle) is not served here; llama-server\'s /infill takes it')
    if data.get('template'):
        raise bad_request(
            'a per-request "template" is not supported: the model\'s own chat template is used; send "raw": true '
            'with the prompt already formatted instead'
        )
    if data.get('raw'):
        if data.get('images'):
            raise bad_request('"images" need the chat template: send them without "raw"')
        return '/v1/completions', _generation({'model': model_id, 'prompt': prompt}, data, ctx)
    messages: list[dict[str, Any]] = []
    if isinstance(data.get('system'), str) and data['system']:
        messages.append({'role': 'system', 'content': data['system']})
    messages.append(_message({'role': 'user', 'content': prompt, 'images': data.get('images')}, vision))
    return '/v1/chat/completions', _generation({'model': model_id, 'messages': messages}, data, ctx)


def embed(data: dict[str, Any], model_id: str, legacy: bool) -> dict[str, Any]:
    """`/api/embed` (`input`: a string or a list) or the older `/api/embeddings` (`prompt`)."""
    inputs = data.get('prompt') if legacy else data.get('input')
    if legacy and not isinstance(inputs, str):
        raise bad_request('"prompt" must be a string')
    if not legacy and not (
        isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs))
    ):
        raise bad_request('"input" must be a string or a list of strings')
    body: dict[str, Any] = {'model': model_id, 'input': inputs}
    if isinstance(data.get('dimensions'), int):
        body['dimensions'] = data['dimensions']
    return body


def _generation(body: dict[str, Any], data: dict[str, Any], ctx: int | None) -> dict[str, Any]:
    body['stream'] = True  # always, whatever the client asked: see the module docstring
    body['stream_options'] = {'include_usage': True}
    body['return_progress'] = True
    body.update(options(data.get('options'), ctx))
    fmt = data.get('format')
    if fmt == 'json':
        body['response_format'] = {'type': 'json_object'}
    elif isinstance(fmt, dict):
        body['response_format'] = {'type': 'json_schema', 'json_schema': {'name': 'response', 'schema': fmt}}
    elif fmt not in (None, ''):
        raise bad_request('"format" must be "json" or a JSON schema object')
    think = data.get('think')
    if isinstance(think, bool):
        body['chat_template_kwargs'] = {'enable_thinking': think}
    elif isinstance(think, str) and think in ('low', 'medium', 'high'):
        body['chat_template_kwargs'] = {'enable_thinking': True}
        body['reasoning_effort'] = think
    elif think is not None:
        raise bad_request('"think" must be true, false, or one of "low", "medium", "high"')
    return body


def options(opts: Any, ctx: int | None) -> dict[str, Any]:
    """Ollama's per-request `options` as llama-server body fields. `num_ctx` cannot resize a running context:
    one within it is served, one beyond it is refused with what to change."""
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise bad_request('"options" must be an object')
    out: dict[str, Any] = {}
    for key in SAME_NAME_OPTIONS:
        if opts.get(key) is not None:
            out[key] = opts[key]
    for key, ours in RENAMED_OPTIONS.items():
        if opts.get(key) is not None:
            out[ours] = opts[key]
    stop = opts.get('stop')
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request('options.stop must be a string or a list of strings')
        out['stop'] = stop
    n = opts.get('num_predict')
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool):
            raise bad_request('options.num_predict must be an integer')
        if n >= 0:  # -1: until it stops, -2: until the context is full; llama-server's default either way
            out['max_tokens'] = n
    num_ctx = opts.get('num_ctx')
    if num_ctx is not None:
        if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1:
            raise bad_request('options.num_ctx must be a positive integer')
        if ctx is not None and num_ctx > ctx:
            raise ProxyError(
                400,
                f'options.num_ctx {num_ctx} is more than the {ctx} tokens of context this model runs with; '
                'raise its ctx_size (Models page, or PUT /api/models/<id>/parameters) to serve it',
                'invalid_request_error',
                'num_ctx_too_large',
            )
    return out


def _message(m: Any, vision: bool) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get('role'), str):
        raise bad_request('each message must be an object with a "role"')
    content = m.get('content') or ''
    if not isinstance(content, str):
        raise bad_request('a message\'s "content" must be a string')
    out: dict[str, Any] = {'role': m['role']}
    images = m.get('images') or []
    if images:
        if not vision:
            raise bad_request('this model takes no images: it has no vision projector (mmproj) next to it')
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise bad_request('"images" must be a list of base64 strings')
        parts: list[dict[str, Any]] = [{'type': 'text', 'text': content}] if content else []
        parts += [{'type': 'image_url', 'image_url': {'url': _data_url(i)}} for i in images]
        out['content'] = parts
    else:
        out['content'] = content
    if isinstance(m.get('thinking'), str) and m['thinking']:
        out['reasoning_content'] = m['thinking']
    calls = m.get('tool_calls')
    if calls is not None:
        if not isinstance(calls, list):
            raise bad_request('"tool_calls" must be a list')
        out['tool_calls'] = [_tool_call(c) for c in calls]
    if m['role'] == 'tool' and isinstance(m.get('tool_name'), str):
        out['name'] = m['tool_name']
    return out


def _link_tool_results(messages: list[dict[str, Any]]) -> None:
    """Ollama's tool results name the tool, not the call; templates that check ids get the calls' ids, in order."""
    pending: list[str] = []
    for m in messages:
        if m.get('tool_calls'):
            pending = [c['id'] for c in m['tool_calls']]
        elif m['role'] == 'tool' and pending and 'tool_call_id' not in m:
            m['tool_call_id'] = pending.pop(0)


def _tool_call(call: Any) -> dict[str, Any]:
    fn = call.get('function') if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get('name'), str):
        raise bad_request('each tool call needs a "function" with a "name"')
    args = fn.get('arguments') or {}
    if not isinstance(args, str):
        try:
            args = jsonio.dumps(args).decode()
        except (jsonio.TooDeep, TypeError, ValueError) as e:
            raise bad_request(f'tool call arguments cannot be sent on: {e}') from None
    # Nine letters and digits: the form the strictest templates (Mistral's) accept.
    return {
        'id': call.get('id') or secrets.token_hex(5)[:9],
        'type': 'function',
        'function': {'name': fn['name'], 'arguments': args},
    }


def _data_url(b64: str) -> str:
    if b64.startswith('data:'):
        return b64
    kind = next((mime for head, mime in _IMAGE_KINDS if b64.startswith(head)), 'image/png')
    return f'data:{kind};base64,{b64}'
