"""An Ollama-compatible face on the same port: clients that speak only Ollama's API use the models unchanged.

Ollama's routes (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`, ...) are raw routes on the front door,
beside `/v1`; none of the app's own `/api/*` routes shares a path with them. Generation and embeddings go through
the proxy's one path (`Proxy.serve_face`): the same scheduler (started on demand, swapped), activity record, auth,
metrics and disconnect handling as `/v1`. The listings come from the library's GGUF metadata and the scheduler.
What Ollama does and this server does not (pulling from its registry, creating, copying, deleting models) is
answered with an Ollama-shaped error that says what to do here instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from core.frontdoor import Receive, Scope, Send
from core.ollama import requests as ollama_requests
from core.ollama.replies import OllamaReply, now_iso
from core.proxy import jsonio
from core.proxy.asgi import ClientGone, Reply, read_body
from core.proxy.errors import ProxyError, bad_request, not_found
from core.proxy.routes import CHAT, PLAIN, TEXT, RouteSpec
from core.supervisor.errors import ModelNotFound, ModelUnusable, NoCapacity, StartFailed

if TYPE_CHECKING:
    from core.library import ModelLibrary
    from core.proxy import Proxy
    from core.proxy.activity import RequestRecord
    from core.supervisor import Scheduler
    from core.supervisor.process import Upstream

log = logging.getLogger(__name__)

# The Ollama API level these routes follow, for clients that check `/api/version` before using a feature (the
# app's own version is under `llama_async_proxy`).
OLLAMA_API_VERSION = '0.12.0'
GENERATE_ROUTES = {'/api/chat': CHAT, '/api/generate': CHAT, '/api/embed': PLAIN, '/api/embeddings': PLAIN}
INSTEAD = {
    '/api/pull': 'this server does not pull from the Ollama registry: put GGUF files in a models folder (Settings), '
    'where they are found at once',
    '/api/push': 'this server does not push models to a registry',
    '/api/create': 'models are GGUF files found in the models folders; set their parameters on the Models page or '
    'with PUT /api/models/<id>/parameters',
    '/api/copy': 'models are GGUF files: copy the file into a models folder, or give the model an alias on the '
    'Models page',
    '/api/delete': 'no model file is deleted through this API; remove the file from its models folder yourself',
    '/api/blobs': 'this server takes no uploaded blobs: models are GGUF files in the models folders',
}


class OllamaAPI:
    def __init__(self, proxy: Proxy, library: ModelLibrary, scheduler: Scheduler, measured: Any = None) -> None:
        self.proxy, self.library, self.scheduler = proxy, library, scheduler
        self._measured = measured  # () -> the latest metrics sample, for the memory a running model takes

    def register_routes(self, frontdoor: Any) -> None:
        for path in GENERATE_ROUTES:
            frontdoor.route(path, self.handle_generation)
        for path, handler in (
            ('/api/version', self.handle_version),
            ('/api/tags', self.handle_tags),
            ('/api/show', self.handle_show),
            ('/api/ps', self.handle_ps),
        ):
            frontdoor.route(path, handler)
        for path in INSTEAD:
            frontdoor.route(path, self.handle_refused, prefix=path == '/api/blobs')

    # ---- generation and embeddings (through the proxy) ----------------------------------------------------
    async def handle_generation(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope['path']
        if scope['method'] != 'POST':
            await _error(send, ProxyError(405, f'{path} takes POST', 'method', headers={'Allow': 'POST'}))
            return
        # The body is read here (the face needs `stream` and `keep_alive` before routing) and handed on.
        try:
            body = await read_body(scope, receive, self.proxy.config.settings.max_body_bytes)
        except ClientGone:
            return
        except ProxyError as e:
            await _error(send, e)
            return
        try:
            data = jsonio.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            await _error(send, bad_request(f'request body is not valid JSON: {e}'))
            return
        if not isinstance(data, dict):
            await _error(send, bad_request('request body must be a JSON object'))
            return
        if path in ('/api/chat', '/api/generate') and _nothing_to_generate(path, data):
            await self._load_or_unload(send, path, data)
            return
        face = _Face(self, send, path, data)
        await self.proxy.serve_face(scope, _replay(body, receive), face, _spec(path, data))

    async def _load_or_unload(self, send: Send, path: str, data: dict[str, Any]) -> None:
        """Ollama's way to load (`{"model": m}`) or unload (`{"model": m, "keep_alive": 0}`) without a prompt."""
        reply = Reply(send)
        try:
            name = ollama_requests.model_name(data)
            entry = self._entry(name)
            keep = ollama_requests.keep_alive_s(data)
            if keep == 0:
                if self.scheduler.busy(entry.id):  # as Ollama: once its requests are answered, not cut
                    self.scheduler.keep_alive(entry.id, 0)
                else:
                    await self.scheduler.unload(entry.id)
                reason = 'unload'
            else:
                await self.scheduler.load(entry.id)
                if keep is not None:
                    self.scheduler.keep_alive(entry.id, keep)
                reason = 'load'
        except ProxyError as e:
            await _error(send, e)
            return
        except ModelNotFound as e:
            await _error(send, not_found(e.message))
            return
        except ModelUnusable as e:
            await _error(send, ProxyError(e.status, e.message, 'model_unusable'))
            return
        except (StartFailed, NoCapacity) as e:
            await _error(send, ProxyError(503, e.message, 'unavailable'))
            return
        piece = {'message': {'role': 'assistant', 'content': ''}} if path == '/api/chat' else {'response': ''}
        with contextlib.suppress(ClientGone):
            await reply.json(
                200, {'model': name, 'created_at': now_iso(), **piece, 'done': True, 'done_reason': reason}
            )

    def _entry(self, name: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise bad_request('the request names no "model"')
        for candidate in ollama_requests.name_candidates(name):
            entry = self.library.get(candidate)
            if entry is not None:
                if entry.error:
                    raise ProxyError(409, f'{entry.id} cannot be loaded: {entry.error}', 'model_unusable')
                return entry
        raise not_found(f'model {name!r} not found')

    def context_of(self, entry: Any) -> int | None:
        """The context the model runs (or would run) with: its ctx_size, else the one in its file."""
        ctx = getattr(self.scheduler.params_for(entry.id), 'ctx_size', None)
        return ctx or entry.meta.context_length

    # ---- listings -----------------------------------------------------------------------------------------
    async def handle_version(self, scope: Scope, receive: Receive, send: Send) -> None:
        from core import __version__

        await Reply(send).json(200, {'version': OLLAMA_API_VERSION, 'llama_async_proxy': __version__})

    async def handle_tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every model found (not only loaded ones), as `ollama list` shows them."""
        models = [self._listed(e) for e in self.library.models() if not e.error]
        await Reply(send).json(200, {'models': models})

    async def handle_show(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope['method'] != 'POST':
            await _error(send, ProxyError(405, '/api/show takes POST', 'method', headers={'Allow': 'POST'}))
            return
        try:
            data = jsonio.loads(await read_body(scope, receive, self.proxy.config.settings.max_body_bytes) or b'{}')
            entry = self._entry(ollama_requests.model_name(data) if isinstance(data, dict) else None)
        except ClientGone:
            return
        except ProxyError as e:
            await _error(send, e)
            return
        except (ValueError, UnicodeDecodeError) as e:
            await _error(send, bad_request(f'request body is not valid JSON: {e}'))
            return
        await Reply(send).json(200, self._shown(entry, verbose=bool(data.get('verbose'))))

    async def handle_ps(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Loaded models. Their memory as measured by the sampler (process RSS, VRAM); the fit estimate, read off
        the loop, for one the sampler has not seen yet."""
        sample = (self._measured() if self._measured is not None else None) or {}
        measured = sample.get('models') or {}
        entries = [e for up in self.scheduler.running() if (e := self.library.get(up.model_id)) is not None]
        unmeasured = [e for e in entries if not measured.get(e.id, {}).get('rss_bytes')]
        fits = await self.library.fits(unmeasured) if unmeasured else {}
        out = []
        for entry in entries:
            m, fit = measured.get(entry.id) or {}, fits.get(entry.id)
            if fit is None:
                size, vram = (m.get('rss_bytes') or 0) + (m.get('vram_bytes') or 0), m.get('vram_bytes') or 0
            else:
                size, vram = fit.ram_needed_bytes + fit.vram_needed_bytes, fit.vram_needed_bytes
            deadline = self.scheduler.idle_deadline(entry.id)
            out.append(
                {
                    **self._listed(entry),
                    'size': size,
                    'size_vram': vram,
                    'expires_at': _iso(deadline) if deadline is not None else None,
                    'context_length': self.context_of(entry),
                }
            )
        await Reply(send).json(200, {'models': out})

    async def handle_refused(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope['path']
        key = '/api/blobs' if path.startswith('/api/blobs') else path
        await _error(send, ProxyError(501, INSTEAD[key], 'not_supported'))

    def _listed(self, entry: Any) -> dict[str, Any]:
        name = tagged(entry.id)
        return {
            'name': name,
            'model': name,
            'modified_at': _iso(entry.mtime),
            'size': entry.size_bytes,
            'digest': digest(entry),
            'details': details(entry),
        }

    def _shown(self, entry: Any, verbose: bool) -> dict[str, Any]:
        params = self.scheduler.params_for(entry.id)
        lines = [f'num_ctx {self.context_of(entry)}'] if self.context_of(entry) else []
        request = getattr(params, 'request', None)
        for key, value in sorted((getattr(request, 'defaults', None) or {}).items()):
            lines.append(f'{key} {value}')
        template = entry.chat_template or ''
        modelfile = [f'# Served by Llama Async Proxy from {entry.path}', f'FROM {entry.path}']
        modelfile += [f'PARAMETER {line}' for line in lines]
        if template:
            modelfile.append(f'TEMPLATE """{template}"""')
        return {
            'license': entry.kv.get('general.license') if isinstance(entry.kv.get('general.license'), str) else '',
            'modelfile': '\n'.join(modelfile) + '\n',
            'parameters': '\n'.join(lines),
            'template': template,
            'details': details(entry),
            'model_info': model_info(entry, verbose),
            'capabilities': capabilities(entry),
            'modified_at': _iso(entry.mtime),
        }


class _Face:
    """One Ollama request on its way through the proxy (`core.proxy.service.Face`)."""

    def __init__(self, api: OllamaAPI, send: Send, path: str, data: dict[str, Any]) -> None:
        self.api, self.path = api, path
        self.kind = {'/api/chat': 'chat', '/api/embed': 'embed', '/api/embeddings': 'embeddings'}.get(path, 'generate')
        if self.kind == 'generate' and data.get('raw'):
            self.kind = 'generate_raw'
        embedding = self.kind in ('embed', 'embeddings')
        self.client_stream = not embedding and data.get('stream', True) is not False  # Ollama streams by default
        name = ollama_requests.model_name(data)
        self.reply = OllamaReply(
            send, self.kind, name if isinstance(name, str) else '', self.client_stream, data.get('think')
        )
        self.keep_alive: float | None = None
        self.model_id: str | None = None

    def model_name(self, data: dict[str, Any]) -> Any:
        return ollama_requests.model_name(data)

    def name_candidates(self, name: str) -> list[str]:
        return ollama_requests.name_candidates(name)

    def translate(self, data: dict[str, Any], entry: Any) -> tuple[str, dict[str, Any]]:
        self.model_id = entry.id
        self.keep_alive = ollama_requests.keep_alive_s(data)  # checked before anything starts
        ctx, vision = self.api.context_of(entry), entry.mmproj is not None
        if self.kind == 'chat':
            return '/v1/chat/completions', ollama_requests.chat(data, entry.id, ctx, vision)
        if self.kind in ('generate', 'generate_raw'):
            return ollama_requests.generate(data, entry.id, ctx, vision)
        return '/v1/embeddings', ollama_requests.embed(data, entry.id, legacy=self.kind == 'embeddings')

    def leased(self, up: Upstream) -> None:
        self.reply.load_ns = int((time.perf_counter() - self.reply.t0) * 1e9)
        # Each Ollama request sets it, as in Ollama: its own keep_alive, or (None) back to the configured ttl. A 0
        # is the scheduler's to act on: it unloads the model once nobody is using it.
        self.api.scheduler.keep_alive(up.model_id, self.keep_alive)

    def finished(self, rec: RequestRecord) -> None:
        failed = self.reply.failed
        if failed is not None and (rec.status or 0) < 400:  # llama-server said 200, the client got an error
            rec.status, rec.error = failed.status, failed.message


def _spec(path: str, data: dict[str, Any]) -> RouteSpec:
    if path == '/api/generate' and data.get('raw'):
        return TEXT
    return GENERATE_ROUTES[path]


def _nothing_to_generate(path: str, data: dict[str, Any]) -> bool:
    if path == '/api/chat':
        return data.get('messages') in (None, [])
    return not data.get('prompt') and not data.get('images')


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over the body already read, then waits for the client's disconnect as usual."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {'type': 'http.request', 'body': body, 'more_body': False}
        return await receive()

    return replay


async def _error(send: Send, err: ProxyError) -> None:
    reply = Reply(send)
    try:
        await reply.json(err.status, {'error': err.message}, err.headers)
    except ClientGone:
        pass


def tagged(model_id: str) -> str:
    """As Ollama names models: with a tag (`:latest` when the id has none)."""
    return model_id if ':' in model_id.rsplit('/', 1)[-1] else f'{model_id}:latest'


def digest(entry: Any) -> str:
    """A stable identifier of the file as found (path, size, time), not a hash of its gigabytes."""
    seed = f'{entry.path}\0{entry.size_bytes}\0{entry.mtime}'.encode()
    return hashlib.sha256(seed).hexdigest()


def details(entry: Any) -> dict[str, Any]:
    meta = entry.meta
    arch = meta.architecture or ''
    return {
        'parent_model': '',
        'format': 'gguf',
        'family': arch,
        'families': [arch] if arch else None,
        'parameter_size': meta.size_label or _parameter_size(meta.n_params),
        'quantization_level': meta.file_type or '',
    }


def capabilities(entry: Any) -> list[str]:
    """In Ollama's words: completion, embedding, vision, tools, thinking, insert."""
    caps = set(entry.capabilities or [])
    out = ['embedding'] if 'embedding' in caps else ['completion']
    template = entry.chat_template or ''
    if 'embedding' not in caps:
        if 'tools' in template:
            out.append('tools')
        if '<think>' in template or 'enable_thinking' in template or 'reasoning_content' in template:
            out.append('thinking')
        if isinstance(entry.kv.get('tokenizer.ggml.fim_pre_token_id'), int):
            out.append('insert')
    if 'vision' in caps or entry.mmproj is not None:
        out.append('vision')
    return out


def model_info(entry: Any, verbose: bool) -> dict[str, Any]:
    """The GGUF key/values; big arrays (the vocabulary) only with `verbose`, as null otherwise, as Ollama does."""
    from core.library.meta import CHAT_TEMPLATE_KEY, kv_to_json

    out: dict[str, Any] = {}
    for key, value in kv_to_json(entry.kv).items():
        if key == CHAT_TEMPLATE_KEY:
            continue
        if isinstance(value, dict) and 'array' in value:  # summarised by the reader: the values are not kept
            out[key] = value if verbose else None
        else:
            out[key] = value
    out.setdefault('general.parameter_count', entry.meta.n_params)
    return out


def _parameter_size(n: int) -> str:
    if not n:
        return ''
    for div, unit in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
        if n >= div:
            return f'{n / div:.1f}{unit}'
    return str(n)


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace('+00:00', 'Z')
    except (OverflowError, ValueError, OSError):  # beyond what a datetime holds: as far as it goes
        return datetime.max.replace(tzinfo=UTC).isoformat().replace('+00:00', 'Z')
