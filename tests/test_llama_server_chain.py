"""The whole chain on a real llama-server: the generated model loads, /health answers, chat completes."""

from __future__ import annotations

import httpx

from tests.conftest import RunningServer


def test_tiny_model_serves_a_chat_completion(llama_server: RunningServer) -> None:
    assert httpx.get(f'{llama_server.base_url}/health').json() == {'status': 'ok'}
    r = httpx.post(
        f'{llama_server.base_url}/v1/chat/completions',
        json={'messages': [{'role': 'user', 'content': 'Hello'}], 'max_tokens': 16},
        timeout=60,
    )
    assert r.status_code == 200
    body = r.json()
    choice = body['choices'][0]
    assert choice['finish_reason'] in ('length', 'stop')
    assert isinstance(choice['message']['content'], str)
    usage = body['usage']
    assert usage['prompt_tokens'] > 0
    assert 0 < usage['completion_tokens'] <= 16
    assert usage['total_tokens'] == usage['prompt_tokens'] + usage['completion_tokens']
