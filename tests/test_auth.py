"""API keys and the Host allowlist at the front door, with the real System served over HTTP."""

from __future__ import annotations

from typing import Any

from core.auth import host_name, key_matches

KEY = 'sk-test-123'


async def test_auth_off_everything_open(make_served: Any) -> None:
    async with await make_served() as s, s.client() as c:
        assert (await c.get('/v1/models')).status_code == 200
        assert (await c.get('/api/requests')).status_code == 200
        r = await c.post('/completion', json={'model': 'tiny-llama', 'prompt': 'hi', 'n_predict': 1})
        assert r.status_code == 200


async def test_auth_on_requires_a_key(make_served: Any) -> None:
    async with await make_served(api_keys=[KEY, 'other']) as s, s.client() as c:
        for path in ('/v1/models', '/api/requests', '/upstream/tiny-llama/slots'):
            r = await c.get(path)
            assert r.status_code == 401, path
            assert r.json()['error']['code'] == 'invalid_api_key'
        assert (await c.get('/v1/models', headers={'Authorization': 'Bearer wrong'})).status_code == 401
        assert (await c.get('/v1/models', headers={'Authorization': f'Bearer {KEY}'})).status_code == 200
        assert (await c.get('/v1/models', headers={'x-api-key': 'other'})).status_code == 200
        r = await c.post('/tokenize', json={'model': 'tiny-llama', 'content': 'hi'}, headers={'x-api-key': KEY})
        assert r.status_code == 200 and r.json()['tokens']
        r = await c.post('/tokenize', json={'model': 'tiny-llama', 'content': 'hi'})
        assert r.status_code == 401
        assert (await c.get('/api/health')).status_code == 200  # liveness stays open


async def test_host_allowlist_blocks_dns_rebinding(make_served: Any) -> None:
    async with await make_served(allowed_hosts=['llm.lan']) as s, s.client() as c:
        assert (await c.get('/v1/models', headers={'Host': 'evil.example'})).status_code == 403
        assert (await c.get('/api/health', headers={'Host': 'evil.example:8080'})).status_code == 403
        for host in ('localhost:8080', '127.0.0.1', '[::1]:1', 'llm.lan:8080', '192.168.1.9:8080'):
            assert (await c.get('/v1/models', headers={'Host': host})).status_code == 200, host


def test_key_and_host_helpers() -> None:
    assert key_matches('a', ['b', 'a']) and not key_matches('a', ['b']) and not key_matches('', [''])
    assert not key_matches(None, ['a'])
    assert host_name('[::1]:8080') == '::1' and host_name('Example.COM.:80') == 'example.com'
    assert host_name('localhost') == 'localhost'


def test_a_changed_allowlist_applies_to_the_next_request() -> None:
    # The guard remembers its decision per Host value; a new config must not meet an old decision.
    from types import SimpleNamespace

    from core.auth import AuthGuard
    from core.settings import Settings

    config = SimpleNamespace(settings=Settings(allowed_hosts=['llm.lan']))
    guard = AuthGuard(config)

    def scope(host: bytes) -> dict[str, Any]:
        return {'type': 'http', 'path': '/v1/models', 'headers': [(b'host', host)]}

    assert guard(scope(b'llm.lan:8080')) is None and guard(scope(b'evil.example')) is not None
    config.settings = Settings(allowed_hosts=['evil.example'])
    assert guard(scope(b'evil.example')) is None and guard(scope(b'llm.lan:8080')) is not None
