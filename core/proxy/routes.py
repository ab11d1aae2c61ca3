"""Which paths the proxy serves and how each is treated."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RouteSpec:
    # chat / text / native: a non-streaming request that may hold its slot a while is streamed from llama-server
    # and assembled here, so that a disconnect stops it (see core/proxy/service.py); a streaming one asks for
    # `return_progress`. None: relayed as it is.
    assemble: str | None = None
    generates: bool = False  # request-time params (defaults, force, strip, max_tokens cap) apply
    max_tokens_field: str = 'max_tokens'


CHAT = RouteSpec('chat', True)
TEXT = RouteSpec('text', True)
NATIVE = RouteSpec('native', True, 'n_predict')
PLAIN = RouteSpec()

# Routed by the body's `model`. The same path is called on the model's llama-server.
ROUTES: dict[str, RouteSpec] = {
    '/v1/chat/completions': CHAT,
    '/v1/completions': TEXT,
    '/v1/embeddings': PLAIN,
    '/v1/rerank': PLAIN,
    '/v1/reranking': PLAIN,
    '/rerank': PLAIN,
    '/v1/responses': RouteSpec(None, True, 'max_output_tokens'),
    '/v1/responses/input_tokens': PLAIN,
    '/v1/chat/completions/input_tokens': PLAIN,
    '/v1/messages': RouteSpec(None, True),
    '/v1/messages/count_tokens': PLAIN,
    '/completion': NATIVE,
    '/infill': NATIVE,
    '/tokenize': PLAIN,
    '/detokenize': PLAIN,
    '/apply-template': PLAIN,
}

# Served at the root like llama-server itself (everything else under /v1/ is one prefix route).
ROOT_PATHS = tuple(p for p in ROUTES if not p.startswith('/v1/'))

# Hop-by-hop and per-connection headers are never forwarded; keys for this proxy never reach llama-server.
DROP_REQUEST_HEADERS = frozenset(
    {
        'host',
        'content-length',
        'connection',
        'keep-alive',
        'proxy-authorization',
        'proxy-connection',
        'te',
        'trailer',
        'transfer-encoding',
        'upgrade',
        'authorization',
        'x-api-key',
        'cookie',
        'accept-encoding',
        'expect',
        'origin',  # llama-server would answer with CORS headers; the front door has decided on CORS already
    }
)
DROP_RESPONSE_HEADERS = frozenset(
    {'connection', 'keep-alive', 'proxy-authenticate', 'trailer', 'transfer-encoding', 'upgrade', 'date', 'server'}
)
