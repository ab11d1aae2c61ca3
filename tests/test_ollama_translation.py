"""The Ollama face's two translations on their own: request bodies into llama-server's, and llama-server's event
stream into Ollama's objects, for what the tiny random-weight fixtures cannot produce through a real server (tool
calls, thinking, images; their vocabulary cannot run a JSON grammar either). The paths themselves run against a
real llama-server in tests/test_ollama.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.ollama import requests as oreq
from core.ollama.replies import OllamaReply
from core.proxy.errors import ProxyError


def test_options_become_llama_server_fields() -> None:
    body = oreq.chat(
        {
            'messages': [{'role': 'user', 'content': 'hi'}],
            'options': {
                'temperature': 0.2,
                'top_k': 5,
                'repeat_penalty': 1.1,
                'seed': 7,
                'stop': 'END',
                'num_predict': 12,
                'num_keep': 4,
                'num_ctx': 2048,
                'num_gpu': 99,  # load-time: not a request field
            },
        },
        'm',
        ctx=4096,
        vision=False,
    )
    assert body['temperature'] == 0.2 and body['top_k'] == 5 and body['repeat_penalty'] == 1.1 and body['seed'] == 7
    assert body['stop'] == ['END'] and body['max_tokens'] == 12 and body['n_keep'] == 4
    assert 'num_gpu' not in body and 'num_ctx' not in body
    assert body['stream'] is True and body['stream_options'] == {'include_usage': True}  # always streamed upstream
    assert 'max_tokens' not in oreq.options({'num_predict': -1}, None)  # until it stops


def test_num_ctx_beyond_the_running_context_is_refused_with_what_to_change() -> None:
    with pytest.raises(ProxyError) as e:
        oreq.options({'num_ctx': 8192}, 4096)
    assert e.value.status == 400 and '4096' in e.value.message and 'ctx_size' in e.value.message


def test_format_think_and_keep_alive() -> None:
    msgs = {'messages': [{'role': 'user', 'content': 'hi'}]}
    assert oreq.chat({**msgs, 'format': 'json'}, 'm', None, False)['response_format'] == {'type': 'json_object'}
    schema = {'type': 'object'}
    fmt = oreq.chat({**msgs, 'format': schema}, 'm', None, False)['response_format']
    assert fmt == {'type': 'json_schema', 'json_schema': {'name': 'response', 'schema': schema}}
    assert oreq.chat({**msgs, 'think': False}, 'm', None, False)['chat_template_kwargs'] == {'enable_thinking': False}
    high = oreq.chat({**msgs, 'think': 'high'}, 'm', None, False)
    assert high['reasoning_effort'] == 'high' and high['chat_template_kwargs'] == {'enable_thinking': True}
    assert [oreq.keep_alive_s({'keep_alive': v}) for v in ('5m', '1h', '30s', 0, -1, '250ms')] == [
        300,
        3600,
        30,
        0,
        -1,
        0.25,
    ]
    assert oreq.keep_alive_s({'keep_alive': '1h30m'}) == 5400
    assert oreq.keep_alive_s({'keep_alive': 10**400}) == -1  # beyond Go's longest duration: for ever
    assert oreq.keep_alive_s({'keep_alive': '99999999h'}) == -1
    for bad in ('soon', float('nan'), True, '5 minutes'):
        with pytest.raises(ProxyError):
            oreq.keep_alive_s({'keep_alive': bad})


def test_messages_with_images_tool_calls_and_tool_results() -> None:
    png = 'iVBORw0KGgoAAAANSUhEUg'
    body = oreq.chat(
        {
            'messages': [
                {'role': 'user', 'content': 'what is this?', 'images': [png]},
                {
                    'role': 'assistant',
                    'content': '',
                    'tool_calls': [{'function': {'name': 'weather', 'arguments': {'city': 'Paris'}}}],
                },
                {'role': 'tool', 'content': '12 C', 'tool_name': 'weather'},
            ],
            'tools': [{'type': 'function', 'function': {'name': 'weather', 'parameters': {'type': 'object'}}}],
        },
        'm',
        None,
        vision=True,
    )
    user, assistant, tool = body['messages']
    assert user['content'] == [
        {'type': 'text', 'text': 'what is this?'},
        {'type': 'image_url', 'image_url': {'url': f'data:image/png;base64,{png}'}},
    ]
    [call] = assistant['tool_calls']
    assert call['function'] == {'name': 'weather', 'arguments': '{"city":"Paris"}'} and call['id']
    assert tool == {'role': 'tool', 'content': '12 C', 'name': 'weather', 'tool_call_id': call['id']}
    assert len(call['id']) == 9 and call['id'].isalnum()
    for bad in (1, True, {'function': {}}):
        with pytest.raises(ProxyError, match='tool'):
            oreq.chat({'messages': [{'role': 'assistant', 'content': '', 'tool_calls': bad}]}, 'm', None, False)
    assert body['tools'][0]['function']['name'] == 'weather'


def test_generate_goes_through_the_template_unless_raw() -> None:
    path, body = oreq.generate({'prompt': 'Why?', 'system': 'Be brief.'}, 'm', None, False)
    assert path == '/v1/chat/completions'
    assert body['messages'] == [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Why?'}]
    path, body = oreq.generate({'prompt': '<s>[INST] Why? [/INST]', 'raw': True}, 'm', None, False)
    assert path == '/v1/completions' and body['prompt'] == '<s>[INST] Why? [/INST]'
    with pytest.raises(ProxyError, match='template'):
        oreq.generate({'prompt': 'x', 'template': '{{ .Prompt }}'}, 'm', None, False)


class Sink:
    """What the client would receive: the ASGI messages the reply sends."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return next(m['status'] for m in self.messages if m['type'] == 'http.response.start')

    def objects(self) -> list[dict[str, Any]]:
        data = b''.join(m.get('body', b'') for m in self.messages if m['type'] == 'http.response.body')
        return [json.loads(line) for line in data.splitlines() if line.strip()]


def sse(*objs: dict[str, Any]) -> bytes:
    return b''.join(b'data: ' + json.dumps(o).encode() + b'\n\n' for o in objs) + b'data: [DONE]\n\n'


def delta(**d: Any) -> dict[str, Any]:
    return {'choices': [{'index': 0, 'delta': d, 'finish_reason': None}]}


TOOL_STREAM = sse(
    delta(role='assistant', reasoning_content='Need the '),
    delta(reasoning_content='weather.'),
    delta(tool_calls=[{'index': 0, 'id': 'c1', 'function': {'name': 'weather', 'arguments': '{"ci'}}]),
    delta(tool_calls=[{'index': 0, 'function': {'arguments': 'ty": "Paris"}'}}]),
    {'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'tool_calls'}]},
    {
        'choices': [],
        'usage': {'prompt_tokens': 11, 'completion_tokens': 9},
        'timings': {'prompt_ms': 4.0, 'predicted_ms': 20.0, 'prompt_n': 11, 'predicted_n': 9},
    },
)


async def _replay(reply: OllamaReply, data: bytes, pieces: int = 7) -> None:
    """Feed the stream in uneven pieces, as the network splits it."""
    await reply.start(200, [], sse=True)
    step = max(1, len(data) // pieces)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks[:-1]:
        await reply.body(chunk)
    await reply.body(chunks[-1], more=False)


async def test_a_streamed_tool_call_arrives_whole_with_thinking_before_it() -> None:
    sink = Sink()
    await _replay(OllamaReply(sink, 'chat', 'm:latest', client_stream=True), TOOL_STREAM)
    objs = sink.objects()
    assert all(o['model'] == 'm:latest' and o['created_at'] for o in objs)
    thinking = ''.join(o['message'].get('thinking', '') for o in objs)
    assert thinking == 'Need the weather.'
    [with_call] = [o for o in objs if o['message'].get('tool_calls')]
    assert with_call['message']['tool_calls'] == [
        {'function': {'index': 0, 'name': 'weather', 'arguments': {'city': 'Paris'}}}
    ]
    final = objs[-1]
    assert (
        final['done'] is True
        and final['done_reason'] == 'stop'
        and [o['done'] for o in objs[:-1]] == [False] * (len(objs) - 1)
    )
    assert final['prompt_eval_count'] == 11 and final['eval_count'] == 9
    assert final['prompt_eval_duration'] == 4_000_000 and final['eval_duration'] == 20_000_000


async def test_not_streamed_one_object_and_think_false_drops_the_thinking() -> None:
    sink = Sink()
    await _replay(OllamaReply(sink, 'chat', 'm', client_stream=False, think=False), TOOL_STREAM)
    [obj] = sink.objects()
    assert sink.status == 200 and obj['done'] is True
    assert 'thinking' not in obj['message'] and obj['message']['tool_calls'][0]['function']['name'] == 'weather'


async def test_generate_pieces_and_an_error_mid_stream() -> None:
    sink = Sink()
    stream = sse(delta(content='Hel'), delta(content='lo')).replace(b'data: [DONE]\n\n', b'')
    stream += b'data: ' + json.dumps({'error': {'code': 500, 'message': 'slot crashed'}}).encode() + b'\n\n'
    await _replay(OllamaReply(sink, 'generate', 'm', client_stream=True), stream, pieces=3)
    objs = sink.objects()
    assert [o.get('response') for o in objs[:-1]] == ['Hel', 'lo']
    assert objs[-1] == {'error': 'slot crashed'}  # the last line, since the 200 was sent already


async def test_an_upstream_error_before_any_byte_keeps_its_status() -> None:
    sink = Sink()
    reply = OllamaReply(sink, 'chat', 'm', client_stream=True)
    await reply.start(400, [(b'content-type', b'application/json')])
    await reply.body(json.dumps({'error': {'code': 400, 'message': 'context too long'}}).encode(), more=False)
    assert sink.status == 400 and sink.objects() == [{'error': 'context too long'}]
