"""The app's perimeter as an attacker probes it: cross-origin reads, routes left open with keys set, unbounded
bodies and slow clients, deep JSON; and the deployment options (TLS, a rate limit per key, keys from a file)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, start_app, stop_process, wait_for

MODEL = 'tiny-llama'
KEY = 'perimeter-key'
EVIL = 'http://evil.example'
CHAT = {'model': MODEL, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 2}


# ---- CORS -----------------------------------------------------------------------------------------------------


async def test_foreign_origins_can_neither_use_nor_read_a_keyless_proxy(make_served: Any) -> None:
    async with await make_served() as s, s.client() as c:
        assert (await c.post(f'/api/models/{MODEL}/load')).status_code == 200
        preflight = await c.options(
            f'/upstream/{MODEL}/props', headers={'Origin': EVIL, 'Access-Control-Request-Method': 'GET'}
        )
        assert preflight.status_code == 403
        assert not any(h.startswith('access-control-') for h in preflight.headers)
        before = len((await c.get('/api/requests')).json()['requests'])
        # A "simple" request a web page may send without a preflight: refused before anything runs.
        r = await c.post(
            '/v1/chat/completions',
            content=json.dumps({**CHAT, 'stream': True}),
            headers={'Origin': EVIL, 'Content-Type': 'text/plain'},
        )
        assert r.status_code == 403 and r.json()['error']['code'] == 'forbidden_origin'
        assert 'access-control-allow-origin' not in r.headers
        assert len((await c.get('/api/requests')).json()['requests']) == before  # never reached the model
        for path in ('/api/config', '/api/models', f'/upstream/{MODEL}/props', '/'):
            r = await c.get(path, headers={'Origin': 'null'})
            assert r.status_code == 403, path
        # Without Origin (curl, SDKs) nothing changes, and llama-server's own CORS headers never pass through.
        r = await c.post('/v1/chat/completions', json={**CHAT, 'stream': True})
        assert r.status_code == 200 and not any(h.startswith('access-control-') for h in r.headers)
        r = await c.get(f'/upstream/{MODEL}/props')
        assert r.status_code == 200 and not any(h.startswith('access-control-') for h in r.headers)
        # The app's own pages send their own origin: allowed.
        own = s.base_url
        assert (await c.get('/api/models', headers={'Origin': own})).status_code == 200


async def test_listed_origins_get_cors_headers_from_us(make_served: Any) -> None:
    app_origin = 'http://localhost:3000'
    async with await make_served(cors_origins=[app_origin]) as s, s.client() as c:
        pre = await c.options(
            '/v1/chat/completions',
            headers={
                'Origin': app_origin,
                'Access-Control-Request-Method': 'POST',
                'Access-Control-Request-Headers': 'content-type, authorization',
            },
        )
        assert pre.status_code == 204
        assert pre.headers['access-control-allow-origin'] == app_origin
        assert 'POST' in pre.headers['access-control-allow-methods']
        assert 'authorization' in pre.headers['access-control-allow-headers']
        for req in (
            c.build_request('POST', '/v1/chat/completions', json={**CHAT, 'stream': True}),
            c.build_request('POST', '/v1/chat/completions', json=CHAT),
            c.build_request('GET', '/api/models'),
            c.build_request('GET', f'/upstream/{MODEL}/props'),
        ):
            req.headers['Origin'] = app_origin
            r = await c.send(req)
            assert r.status_code == 200, req.url
            assert r.headers.get_list('access-control-allow-origin') == [app_origin]  # one, ours
            assert 'access-control-allow-credentials' not in r.headers
        assert (await c.get('/api/models', headers={'Origin': EVIL})).status_code == 403


async def test_cross_site_requests_without_an_origin_are_refused(make_served: Any) -> None:
    # <img src=".../upstream/tiny-llama/health"> sends no Origin, but says where it comes from; it would load a model.
    async with await make_served() as s, s.client() as c:
        tag = {'Sec-Fetch-Site': 'cross-site', 'Sec-Fetch-Mode': 'no-cors', 'Sec-Fetch-Dest': 'image'}
        for path in (f'/upstream/{MODEL}/health', '/api/models', '/v1/models'):
            assert (await c.get(path, headers=tag)).status_code == 403, path
        assert s.system.scheduler.describe(MODEL)['status'] == 'stopped'
        link = {'Sec-Fetch-Site': 'cross-site', 'Sec-Fetch-Mode': 'navigate', 'Sec-Fetch-Dest': 'document'}
        assert (await c.get('/login', headers=link)).status_code != 403  # following a link to a page is fine
        # ... but not to something that acts, nor into another site's frame
        assert (await c.get(f'/upstream/{MODEL}/health', headers=link)).status_code == 403
        framed = {**link, 'Sec-Fetch-Dest': 'iframe'}
        assert (await c.get('/login', headers=framed)).status_code == 403
        assert s.system.scheduler.describe(MODEL)['status'] == 'stopped'
        r = await c.get('/api/models')
        assert (
            r.headers['x-frame-options'] == 'DENY' and "frame-ancestors 'none'" in r.headers['content-security-policy']
        )
        own = {'Sec-Fetch-Site': 'same-origin', 'Sec-Fetch-Mode': 'cors'}
        assert (await c.get('/api/models', headers=own)).status_code == 200


async def test_a_listed_origin_can_read_the_refusals_too(make_served: Any) -> None:
    app_origin = 'http://localhost:3000'
    async with await make_served(cors_origins=[app_origin], api_keys=[KEY]) as s, s.client() as c:
        r = await c.get('/v1/models', headers={'Origin': app_origin})
        assert r.status_code == 401 and r.headers['access-control-allow-origin'] == app_origin
        asked = 'authorization, content-type, x-stainless-os, x-stainless-retry-count'
        pre = await c.options(
            '/v1/chat/completions',
            headers={
                'Origin': app_origin,
                'Access-Control-Request-Method': 'POST',
                'Access-Control-Request-Headers': asked,
            },
        )
        assert pre.status_code == 204 and pre.headers['access-control-allow-headers'] == asked  # no key needed


async def test_settings_that_name_files_or_programs_are_not_changed_over_http(make_served: Any, tmp_path: Path) -> None:
    async with await make_served() as s, s.client() as c:
        for field, value in (
            ('llama_server_path', '/bin/sh'),
            ('api_keys_file', '/etc/passwd'),
            ('data_dir', '/etc'),
            ('ssl_certfile', '/etc/passwd'),
        ):
            r = await c.put('/api/config', json={field: value})
            assert r.status_code == 422, field
            assert r.json()['detail'][0]['field'] == field and 'config file' in r.json()['detail'][0]['message']
        assert not s.system.config.config_path.exists()
        assert (await c.put('/api/config', json={'sse_heartbeat': 20})).status_code == 200  # the rest can


def test_an_unreadable_key_file_stops_the_app_instead_of_opening_it(tmp_path: Path) -> None:
    for content in (None, '# no key here\n'):
        keys = tmp_path / 'keys.txt'
        if content is None:
            keys.unlink(missing_ok=True)
        else:
            keys.write_text(content)
        env = {**_env(tmp_path), 'LAP_API_KEYS_FILE': str(keys)}
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / 'main.py'),
                '--no-browser',
                '--port',
                '1',
                '--config',
                str(tmp_path / 'c.json'),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode != 0 and 'api_keys_file' in run.stderr, run.stderr


def test_helpers_of_the_perimeter() -> None:
    from core.auth import is_loopback_client
    from ui.login import _local_path

    assert is_loopback_client({'client': ('::ffff:127.0.0.1', 1)}) and is_loopback_client({'client': ('::1', 1)})
    assert not is_loopback_client({'client': ('192.168.1.2', 1)}) and not is_loopback_client({})
    assert _local_path('/models?x=1') and _local_path('/')
    assert not any(_local_path(p) for p in ('//evil', '/\\evil', 'http://e', '/\t/evil.example', '/\n/e', ''))


# ---- keys -----------------------------------------------------------------------------------------------------

ROUTES_DUMP = """
import json, sys
import main
system = main.build(main.parse_args(['--config', sys.argv[1]]))
from nicegui import app

def walk(routes):
    for r in routes:
        inner = getattr(r, 'original_router', None)
        if inner is not None:
            yield from walk(inner.routes)
        else:
            yield type(r).__name__, r.path, sorted(getattr(r, 'methods', None) or ['GET'])

out = [list(r) for r in walk(app.routes)]
out += [['FrontDoor', p, ['GET', 'POST']] for p in system.frontdoor._exact]
out += [['FrontDoorPrefix', p, ['GET', 'POST']] for p, _ in system.frontdoor._prefixes]
print('ROUTES=' + json.dumps(out))
"""
# Added by `ui.run(fastapi_docs=True)` when the server starts, so not in the table built above.
RUNTIME_ROUTES = [('APIRoute', p, ['GET']) for p in ('/docs', '/redoc', '/openapi.json', '/docs/oauth2-redirect')]
# What may answer without a key: a liveness probe and what the login page needs.
PUBLIC = re.compile(r'^(/api/health|/login|/_nicegui/.*|/_nicegui_ws)$')
PAGES = {'/', '/models', '/downloads', '/activity', '/monitoring', '/nodes', '/logs', '/settings', '/chat'}


def _concrete(kind: str, path: str) -> str:
    path = re.sub(r'\{[^}]+\}', 'x', path)
    if kind == 'Mount':  # something under a mounted app
        path += '/x'
    if kind == 'FrontDoorPrefix':  # something under it
        path += f'{MODEL}/props' if path == '/upstream/' else 'x'
    return path


def test_with_keys_set_every_route_in_the_table_needs_one(tmp_path: Path, models_dir: Path) -> None:
    dump = subprocess.run(
        [sys.executable, '-c', ROUTES_DUMP, str(tmp_path / 'dump-config.json')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(tmp_path), 'LAP_API_KEYS': KEY},
        check=True,
    )
    routes = json.loads(dump.stdout.split('ROUTES=', 1)[1]) + RUNTIME_ROUTES
    assert len(routes) > 30 and any(p == '/metrics' for _, p, _ in routes)
    app = start_app(tmp_path, '--models-dir', str(models_dir), env={'LAP_API_KEYS': KEY})
    seen_public: set[str] = set()
    try:
        with httpx.Client(base_url=app.base_url, timeout=30, follow_redirects=False) as c:
            for kind, path, methods in routes:
                url = _concrete(kind, path)
                for method in methods:
                    if method in ('HEAD', 'OPTIONS'):
                        continue
                    r = c.request(method, url)
                    where = f'{kind} {method} {path}'
                    if path in PAGES:
                        assert r.status_code == 303, where
                        assert r.headers['location'].startswith('/login?next='), where
                        assert 'Llama Async Proxy' not in r.text  # nothing of the page was built
                    elif PUBLIC.match(path):
                        assert r.status_code != 401, where
                        seen_public.add(path)
                    else:
                        assert r.status_code == 401, where
                        assert r.json()['error']['code'] == 'invalid_api_key', where
                        assert r.headers['www-authenticate'] == 'Bearer'
                        with c.stream(method, url, headers={'Authorization': f'Bearer {KEY}'}) as ok:
                            assert ok.status_code != 401, where  # (not read: /api/events streams for ever)
            assert {'/api/health', '/login'} <= seen_public
            assert c.get('/login').status_code == 200
            # NiceGUI's socket does not open for a client no page built (a page builds only after login).
            assert c.get('/metrics', headers={'x-api-key': KEY}).status_code == 200
    finally:
        stop_process(app.proc, timeout=20)


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith('LAP_') and k != 'PYTEST_CURRENT_TEST'}
    return {**env, 'LAP_DATA_DIR': str(tmp_path / 'dump-data'), 'LAP_SCAN_WELL_KNOWN_DIRS': 'false'}


async def test_metrics_may_be_left_open_to_a_local_scraper(make_served: Any) -> None:
    async with await make_served(api_keys=[KEY]) as s, s.client() as c:
        assert (await c.get('/metrics')).status_code == 401
        assert (await c.get('/openapi.json')).status_code == 401
    async with await make_served(api_keys=[KEY], metrics_without_key=True) as s, s.client() as c:
        r = await c.get('/metrics')
        assert r.status_code == 200 and 'lap_' in r.text
        assert (await c.get('/api/models')).status_code == 401  # only /metrics


async def test_rate_limit_per_key_answers_429_with_retry_after(make_served: Any) -> None:
    async with await make_served(api_keys=[KEY, 'other'], rate_limit_per_minute=3) as s, s.client() as c:
        statuses = [(await c.get('/api/models', headers={'x-api-key': KEY})).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        r = await c.get('/v1/models', headers={'x-api-key': KEY})
        assert r.status_code == 429 and int(r.headers['retry-after']) >= 1
        assert r.json()['error']['type'] == 'rate_limit_error'
        assert (await c.get('/api/models', headers={'x-api-key': 'other'})).status_code == 200  # per key
        assert (await c.get('/api/health')).status_code == 200  # the liveness probe is not counted


async def test_keys_can_come_from_a_file(make_served: Any, tmp_path: Path) -> None:
    keys = tmp_path / 'keys.txt'
    keys.write_text('# team keys\nfile-key-1\n\nfile-key-2\n')
    async with await make_served(api_keys_file=keys) as s, s.client() as c:
        assert (await c.get('/api/models')).status_code == 401
        for key in ('file-key-1', 'file-key-2'):
            assert (await c.get('/api/models', headers={'x-api-key': key})).status_code == 200
        assert (await c.get('/api/models', headers={'x-api-key': '# team keys'})).status_code == 401
        shown = (await c.get('/api/config', headers={'x-api-key': 'file-key-1'})).json()['settings']
        assert 'file-key-1' not in json.dumps(shown)


# ---- limits ---------------------------------------------------------------------------------------------------


async def test_one_body_limit_for_every_route(make_served: Any) -> None:
    async with await make_served(max_body_bytes=64 * 1024) as s, s.client() as c:
        big = b'{"x": "' + b'a' * 200_000 + b'"}'
        for method, path in (('PUT', '/api/config'), ('PUT', '/api/parameters'), ('POST', '/v1/chat/completions')):
            r = await c.request(method, path, content=big, headers={'Content-Type': 'application/json'})
            assert r.status_code == 413, path

            async def chunks() -> Any:  # no Content-Length: counted as it streams in
                for _ in range(10):
                    yield b'a' * 32 * 1024

            r = await c.request(method, path, content=chunks(), headers={'Content-Type': 'application/json'})
            assert r.status_code == 413, path
            assert 'max_body_bytes' in r.text
        assert not s.system.config.config_path.exists()
        assert (await c.get('/api/health')).status_code == 200


async def test_deeply_nested_json_is_an_openai_400(make_served: Any) -> None:
    async with await make_served() as s, s.client() as c:
        for depth in (300, 1000, 5000):
            nested = '[' * depth + ']' * depth
            body = json.dumps({'model': MODEL, 'messages': [{'role': 'user', 'content': 'NESTED'}]})
            body = body.replace('"NESTED"', nested)
            r = await c.post('/v1/chat/completions', content=body, headers={'Content-Type': 'application/json'})
            assert r.status_code == 400, (depth, r.text)
            assert r.json()['error']['type'] == 'invalid_request_error'
            r = await c.put(
                '/api/config', content='{"a": ' + nested + '}', headers={'Content-Type': 'application/json'}
            )
            assert 400 <= r.status_code < 500, (depth, r.status_code)
        # Passed through to llama-server as it came, after a parse: 100k levels would crash it.
        deep = '{"json_schema": ' + '{"a":' * 100_000 + '1' + '}' * 100_000 + '}'
        r = await c.post(f'/upstream/{MODEL}/v1/chat/completions', content=deep)
        assert r.status_code == 400 and r.json()['error']['code'] == 'invalid_json'
        state = s.system.scheduler.describe(MODEL)
        assert state['restarts'] == 0 and state['status'] in ('stopped', 'ready')  # nothing crashed
        assert (await c.get('/v1/chat/completions')).headers['allow'] == 'POST'


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(('127.0.0.1', port), timeout=10)
    return sock


def _closed(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes this connection within `within_s` (reads EOF or a reset)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def test_slow_clients_are_closed_and_connections_are_capped(make_served: Any) -> None:
    async with await make_served(client_timeout=0.5, max_connections=20) as s:
        port = int(s.base_url.rsplit(':', 1)[1])
        slow_headers = _connect(port)
        slow_headers.sendall(b'GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ')
        stalled_body = _connect(port)
        stalled_body.sendall(
            b'PUT /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
            b'Content-Length: 100\r\n\r\n{"sse_heart'
        )
        stalled_proxy = _connect(port)
        stalled_proxy.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"model": '
        )
        t0 = time.monotonic()
        for sock in (slow_headers, stalled_body, stalled_proxy):
            assert await asyncio.to_thread(_closed, sock, 5), 'a slow client was kept'
            sock.close()
        assert time.monotonic() - t0 < 4

        # A connection that never sends a byte.
        silent = _connect(port)
        assert await asyncio.to_thread(_closed, silent, 5)
        silent.close()

        # A stray CRLF after a whole request on a kept-alive connection starts the clock too.
        def keep_alive_then_crlf() -> bool:
            with _connect(port) as sock:
                sock.sendall(b'GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
                assert sock.recv(65536).startswith(b'HTTP/1.1 200')
                sock.sendall(b'\r\n')
                return _closed(sock, 5)

        assert await asyncio.to_thread(keep_alive_then_crlf)

        # A header line that never ends: refused as it grows, not kept in memory for client_timeout.
        def endless_header() -> bytes:
            with _connect(port) as sock:
                sock.sendall(b'GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ')
                for _ in range(40):
                    try:
                        sock.sendall(b'a' * 8192)
                    except OSError:
                        break
                return sock.recv(100)

        assert (await asyncio.to_thread(endless_header)).startswith(b'HTTP/1.1 431')

        # Headers over the limit: 431, closed.
        def too_big_headers() -> bytes:  # in a thread: the server runs on this test's event loop
            with _connect(port) as huge:
                huge.sendall(b'GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ' + b'a' * 70_000 + b'\r\n\r\n')
                return huge.recv(100)

        assert (await asyncio.to_thread(too_big_headers)).startswith(b'HTTP/1.1 431')
        # Half-open connections beyond max_connections are refused at once; the rest time out.
        held = [_connect(port) for _ in range(30)]
        for sock in held:
            sock.sendall(b'GET /api/health HTTP/1.1\r\n')
        refused = sum(await asyncio.gather(*(asyncio.to_thread(_closed, sock, 0.3) for sock in held)))
        assert refused >= 10
        assert all(await asyncio.gather(*(asyncio.to_thread(_closed, sock, 5) for sock in held)))
        for sock in held:
            sock.close()
        async with s.client() as c:
            await wait_for(lambda: s.server.server_state.connections.__len__() <= 1, 5)
            assert (await c.get('/api/health')).status_code == 200


# ---- TLS ------------------------------------------------------------------------------------------------------


def test_tls_with_a_self_signed_pair(tmp_path: Path, models_dir: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert('127.0.0.1', 'localhost')
    cert_file, key_file, ca_file = tmp_path / 'cert.pem', tmp_path / 'key.pem', tmp_path / 'ca.pem'
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    port_app = start_app(
        tmp_path,
        '--models-dir',
        str(models_dir),
        '--ssl-certfile',
        str(cert_file),
        '--ssl-keyfile',
        str(key_file),
        health_scheme='https',
        verify=ssl.create_default_context(cafile=str(ca_file)),
    )
    try:
        url = port_app.base_url.replace('http://', 'https://')
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=30) as c:
            assert c.get(f'{url}/api/health').json()['status'] == 'ok'
            assert c.get(f'{url}/v1/models').json()['data']
        with pytest.raises(httpx.HTTPError):
            httpx.get(f'{port_app.base_url}/api/health', timeout=5)  # plain HTTP is not served
    finally:
        stop_process(port_app.proc, timeout=20)
