"""Cross-origin requests: off by default, on for the origins the `cors_origins` setting names.

A key-less app on loopback is reachable from every web page the user opens: the browser sends a "simple"
cross-origin POST (a `text/plain` body) without asking first, and a websocket without any CORS at all. So a
request that carries an `Origin` that is neither this app's own (the Host it was sent to) nor listed is refused
with 403 before anything runs, and a listed origin gets `Access-Control-Allow-*` on every answer from us (the
proxy drops llama-server's own CORS headers). Preflights are answered here, before the key check, as browsers
send them without credentials. Requests without `Origin` (curl, SDKs, servers) are not affected.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from core.frontdoor import RESPONSE_HEADERS, ASGIApp, Receive, Scope, Send, error_app

ALLOW_METHODS = b'GET, POST, PUT, DELETE, OPTIONS'
# A listed origin's preflight gets back the headers it asks for (SDKs send many x-stainless-* ones); without the
# question, these.
ALLOW_HEADERS = b'authorization, content-type, x-api-key, anthropic-version, openai-beta'
MAX_AGE = b'600'
FRAMES = frozenset({b'iframe', b'frame', b'embed', b'object'})
NOT_NAVIGABLE = ('/v1', '/upstream/', '/api/')  # a link from another site to these would act (load a model)


def _origin_host(origin: str) -> str | None:
    """`http://Example.com:8080` -> `example.com:8080`; None for `null` and anything that is no http(s) origin."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return None
    if parts.scheme not in ('http', 'https') or not parts.netloc:
        return None
    return parts.netloc.lower()


class CorsGuard:
    """A front-door guard (see `core/frontdoor.py`): refuses foreign origins, answers preflights of listed ones."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def allowed(self, origin: str) -> bool:
        listed = self.config.settings.cors_origins
        return '*' in listed or origin.rstrip('/').lower() in {o.rstrip('/').lower() for o in listed}

    def __call__(self, scope: Scope) -> ASGIApp | None:
        origin = host = None
        site = mode = dest = asked = method = b''
        for name, value in scope.get('headers') or ():
            if name == b'origin':
                origin = value.decode('latin-1')
            elif name == b'host':
                host = value.decode('latin-1').lower()
            elif name == b'sec-fetch-site':
                site = value
            elif name == b'sec-fetch-mode':
                mode = value
            elif name == b'sec-fetch-dest':
                dest = value
            elif name == b'access-control-request-headers':
                asked = value
            elif name == b'access-control-request-method':
                method = value
        if origin is None:
            # No Origin on a cross-site GET (an <img> or <script> tag, a frame), but modern browsers say where it
            # comes from: such a request could still load a model. Following a link to a page is fine.
            if site in (b'cross-site', b'same-site') and not (
                mode == b'navigate' and dest not in FRAMES and not scope.get('path', '').startswith(NOT_NAVIGABLE)
            ):
                return _refuse('another site')
            return None  # not a browser's cross-origin request: nothing to decide
        listed = self.allowed(origin)
        if not listed and (host is None or _origin_host(origin) != host):
            return _refuse(origin)
        if not listed:
            return None  # this app's own pages
        headers = [(b'access-control-allow-origin', origin.encode('latin-1')), (b'vary', b'Origin')]
        if method and scope['type'] == 'http' and scope.get('method') == 'OPTIONS':
            return _preflight(headers, asked or ALLOW_HEADERS)
        scope.setdefault(RESPONSE_HEADERS, []).extend([*headers, (b'access-control-expose-headers', b'retry-after')])
        return None


def _refuse(origin: str) -> ASGIApp:
    message = f'{origin!r} may not use this server: add its origin to the cors_origins setting to let that page in'
    return error_app(403, message, 'forbidden_error', 'forbidden_origin')


def _preflight(headers: list[tuple[bytes, bytes]], allow_headers: bytes) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        out = [
            *headers,
            (b'access-control-allow-methods', ALLOW_METHODS),
            (b'access-control-allow-headers', allow_headers),
            (b'access-control-max-age', MAX_AGE),
            (b'content-length', b'0'),
        ]
        await send({'type': 'http.response.start', 'status': 204, 'headers': out})
        await send({'type': 'http.response.body', 'body': b''})

    return app
