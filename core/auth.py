"""API keys, the Host allowlist and the per-key rate limit, checked at the front door for every request.

With keys (`api_keys`, `api_keys_file`) set, every path needs `Authorization: Bearer <key>` or `x-api-key: <key>`
(compared in constant time) except what the login page itself needs (`PUBLIC`, NiceGUI's assets and socket) and the
pages, which check the browser's login before they build (they are registered in `pages`). A path that nobody
listed is therefore closed, not open. The Host check defends a loopback-bound, key-less install against DNS
rebinding: a web page on `evil.example` that rebinds its name to 127.0.0.1 still sends `Host: evil.example`, which
is refused. An IP literal in Host can never come from rebinding, so it always passes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import socket
import time
from collections.abc import Iterable
from typing import Any

from core.frontdoor import ASGIApp, Scope, error_app

# Open with keys set: a liveness probe that tells no secrets, and what the login page loads. NiceGUI's socket only
# reaches a client that a page built, and pages build only after login.
PUBLIC = frozenset({'/api/health', '/login', '/favicon.ico'})
PUBLIC_PREFIXES = ('/_nicegui/', '/_nicegui_ws/')
METRICS_PATH = '/metrics'
LOOPBACK_NAMES = frozenset({'localhost', 'localhost.localdomain', 'ip6-localhost', 'ip6-loopback'})


def needs_key(path: str, pages: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether `path` needs a key header when keys are set (`pages` check the browser's login themselves)."""
    return not (path in PUBLIC or path in pages or path.startswith(PUBLIC_PREFIXES))


def is_loopback_client(scope: Scope) -> bool:
    client = scope.get('client')
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, 'ipv4_mapped', None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


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
        self.pages: set[str] = set()  # page routes: they redirect to /login themselves (see ui/layout.page)
        self._limiter = RateLimiter()
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
                403,
                f'Host {raw.decode("latin-1")!r} is not allowed (DNS rebinding protection); add it to the '
                'allowed_hosts setting',
                'forbidden_host',
            )
        keys = settings.api_keys
        if not keys:
            return None
        path = scope.get('path', '')
        if not needs_key(path, self.pages):
            return None
        if path == METRICS_PATH and settings.metrics_without_key and is_loopback_client(scope):
            return None
        given = key_from_headers(headers)
        if not key_matches(given, keys):
            return _deny(
                401,
                'Missing or invalid API key: send "Authorization: Bearer <key>" or "x-api-key: <key>"',
                'invalid_api_key',
            )
        limit = settings.rate_limit_per_minute
        if limit:
            wait = self._limiter.take(given or '', limit)
            if wait:
                return _deny(
                    429,
                    f'Over the rate limit of {limit} requests a minute for this key (rate_limit_per_minute); '
                    f'retry in {wait} s',
                    'rate_limited',
                    retry_after=wait,
                    type_='rate_limit_error',
                )
        return None


class RateLimiter:
    """A token bucket per key: `limit` a minute, bursts up to `limit`. Keys are only ever valid ones."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, limit: int) -> int:
        """0 when the request may go, else whole seconds until it may."""
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (float(limit), now))
        tokens = min(float(limit), tokens + (now - at) * limit / 60.0)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) * 60.0 / limit))
        self._buckets[key] = (tokens - 1.0, now)
        return 0


def _deny(
    status: int,
    message: str,
    code: str,
    retry_after: int | None = None,
    type_: str = 'authentication_error',
) -> ASGIApp:
    headers: tuple[tuple[bytes, bytes], ...] = ((b'www-authenticate', b'Bearer'),) if status == 401 else ()
    if retry_after is not None:
        headers += ((b'retry-after', str(retry_after).encode()),)
    return error_app(status, message, type_, code, headers)
