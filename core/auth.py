"""API keys and the Host allowlist, checked at the front door for every request.

Keys (`api_keys`) protect the proxied paths and `/api/*`: `Authorization: Bearer <key>` or `x-api-key: <key>`,
compared in constant time. The Host check defends a loopback-bound, key-less install against DNS rebinding: a web
page on `evil.example` that rebinds its name to 127.0.0.1 still sends `Host: evil.example`, which is refused.
An IP literal in Host can never come from rebinding, so it always passes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Iterable
from typing import Any

from core.frontdoor import ASGIApp, Receive, Scope, Send

# Paths that need a key when keys are set. `/api/health` stays open as a liveness probe (it tells no secrets).
PROTECTED_PREFIXES = ('/v1/', '/upstream/', '/api/')
PROTECTED_EXACT = frozenset(
    {'/v1', '/api', '/completion', '/infill', '/tokenize', '/detokenize', '/apply-template', '/rerank'}
)
PUBLIC = frozenset({'/api/health'})
LOOPBACK_NAMES = frozenset({'localhost', 'localhost.localdomain', 'ip6-localhost', 'ip6-loopback'})


def needs_key(path: str) -> bool:
    if path in PUBLIC:
        return False
    return path in PROTECTED_EXACT or path.startswith(PROTECTED_PREFIXES)


def key_digest(key: str) -> str:
    """What the UI keeps in the browser instead of the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(candidate: str | None, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit that would leak which one)."""
    if not candidate:
        return False
    given = candidate.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def digest_matches(digest: str | None, keys: Iterable[str]) -> bool:
    return key_matches(digest, [key_digest(k) for k in keys])


def key_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b'authorization':
            scheme, _, token = value.decode('latin-1').partition(' ')
            if scheme.lower() == 'bearer' and token.strip():
                return token.strip()
        elif name == b'x-api-key':
            return value.decode('latin-1').strip()
    return None


def host_name(value: str) -> str:
    """The name part of a Host header: `[::1]:8080` -> `::1`, `Example.com.:80` -> `example.com`."""
    value = value.strip().lower()
    if value.startswith('['):
        return value[1 : value.find(']')] if ']' in value else value[1:]
    if value.count(':') == 1:
        value = value.split(':', 1)[0]
    return value.rstrip('.')


@functools.lru_cache(maxsize=256)  # checked on every request; a client sends the same Host each time
def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AuthGuard:
    """A front-door guard: `guard(scope)` returns None to pass, or an ASGI app that answers 401/403."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._machine_names = self._local_names()
        self._hosts: dict[bytes, bool] = {}  # Host header value -> allowed, for `_hosts_for` (a Settings object)
        self._hosts_for: Any = None

    @staticmethod
    def _local_names() -> frozenset[str]:
        names = {socket.gethostname().lower()}
        try:
            names.add(socket.getfqdn().lower())
        except OSError:
            pass
        return frozenset(n.rstrip('.') for n in names if n)

    def allowed_host(self, name: str) -> bool:
        settings = self.config.settings
        if not name or _is_ip(name) or name in LOOPBACK_NAMES or name.endswith('.localhost'):
            return True
        allowed = {host_name(h) for h in getattr(settings, 'allowed_hosts', [])}
        if '*' in allowed or name in allowed or name == host_name(settings.host):
            return True
        # Bound to every interface: the machine's own names are how people on the network reach it.
        return settings.host in ('0.0.0.0', '::') and name in self._machine_names

    def __call__(self, scope: Scope) -> ASGIApp | None:
        headers = scope.get('headers') or []
        raw = next((v for k, v in headers if k == b'host'), b'')
        settings = self.config.settings
        if settings is not self._hosts_for or len(self._hosts) > 256:  # a new config, or a flood of names
            self._hosts, self._hosts_for = {}, settings
        ok = self._hosts.get(raw)
        if ok is None:  # decided once per Host value: this runs before every request
            ok = self._hosts[raw] = self.allowed_host(host_name(raw.decode('latin-1')))
        if not ok:
            return _deny(
                scope,
                403,
                f'Host {raw.decode("latin-1")!r} is not allowed (DNS rebinding protection); add it to the '
                'allowed_hosts setting',
                'forbidden_host',
            )
        keys = settings.api_keys
        if keys and needs_key(scope.get('path', '')) and not key_matches(key_from_headers(headers), keys):
            return _deny(
                scope,
                401,
                'Missing or invalid API key: send "Authorization: Bearer <key>" or "x-api-key: <key>"',
                'invalid_api_key',
            )
        return None


def _deny(scope: Scope, status: int, message: str, code: str) -> ASGIApp:
    body = json.dumps({'error': {'message': message, 'type': 'authentication_error', 'code': code}}).encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope['type'] == 'websocket':
            await send({'type': 'websocket.close', 'code': 1008})
            return
        headers = [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode())]
        if status == 401:
            headers.append((b'www-authenticate', b'Bearer'))
        await send({'type': 'http.response.start', 'status': status, 'headers': headers})
        await send({'type': 'http.response.body', 'body': body})

    return app
