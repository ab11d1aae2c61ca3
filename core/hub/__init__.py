"""Finding models on Hugging Face (or a mirror, `HF_ENDPOINT`): search repos with GGUF files, and open one to see
its files by quantization with sizes and a memory-fit estimate, read from the file's real GGUF header where a range
request can fetch it (else from its size). Built on `huggingface_hub` (the maintained client: auth, endpoints);
every call blocks, so each runs in a thread.

Downloads (jobs with progress, resume and verification) are not here yet: see issue 16.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from core.hub.files import RepoFile, Variant, variants

if TYPE_CHECKING:
    from core.library import ModelLibrary

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = 'https://huggingface.co'
SEARCH_LIMIT = 40
HEADER_FIRST_BYTES = 4 << 20  # enough for most headers; a big vocabulary needs more
HEADER_MAX_BYTES = 64 << 20  # past this the estimate comes from the size alone
REACH_TIMEOUT_S = 5.0
REACHED_FOR_S = 60.0
FIT_HEADERS = 12  # variants per repo whose header is fetched (the rest: from their size)


class HubError(Exception):
    """What a user should read (`message`) and the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class HubService:
    def __init__(self, config: Any, library: ModelLibrary) -> None:
        self.config, self.library = config, library
        self._reached: dict[str, float] = {}  # endpoint -> until when it counts as reachable

    # ---- where and who -------------------------------------------------------------------------------------
    def endpoint(self) -> str:
        s = self.config.settings
        return (s.hf_endpoint or os.environ.get('HF_ENDPOINT') or DEFAULT_ENDPOINT).rstrip('/')

    def _token(self) -> str | None:
        return self.config.settings.hf_token or os.environ.get('HF_TOKEN') or None

    def _reachable(self) -> None:
        """Fail at once when the endpoint cannot be reached: huggingface_hub retries a refused connection five
        times with backoff (23 s here) before it gives up, too long for a search box. Remembered for a while."""
        endpoint = self.endpoint()
        if self._reached.get(endpoint, 0.0) > time.monotonic():
            return
        try:
            with httpx.Client(timeout=REACH_TIMEOUT_S, follow_redirects=False, trust_env=True) as client:
                client.head(endpoint)
        except httpx.HTTPError as e:
            raise HubError(502, f'cannot reach {endpoint}: {e}') from e
        self._reached[endpoint] = time.monotonic() + REACHED_FOR_S

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        # token=False when none is set: the machine's cached login is not sent to an endpoint we were told of.
        return HfApi(endpoint=self.endpoint(), token=self._token() or False)

    # ---- find ----------------------------------------------------------------------------------------------
    async def search(self, query: str, limit: int = SEARCH_LIMIT) -> list[dict[str, Any]]:
        """Repos with GGUF files matching `query`, most downloaded first."""
        return await asyncio.to_thread(self._search, query, limit)

    def _search(self, query: str, limit: int) -> list[dict[str, Any]]:
        self._reachable()
        with self._errors(query):
            found = self._api().list_models(
                search=query or None,
                filter='gguf',
                sort='downloads',
                limit=limit,
                expand=['downloads', 'likes', 'lastModified', 'gated'],
            )
            return [
                {
                    'repo': m.id,
                    'downloads': m.downloads,
                    'likes': m.likes,
                    'updated': m.last_modified.isoformat() if m.last_modified else None,
                    'gated': bool(m.gated),
                }
                for m in found
            ]

    async def repo(self, repo_id: str, revision: str | None = None) -> dict[str, Any]:
        """The repo's GGUF files as variants (one per quantization; split parts as one), each with a fit estimate."""
        info = await asyncio.to_thread(self._info, repo_id, revision)
        found = variants(info['files'])
        models = [v for v in found if not v.mmproj]
        free = await asyncio.to_thread(_free_memory)  # NVML and psutil may block: once, off the loop
        estimates = await asyncio.gather(
            *(self._fit(repo_id, info['sha'], v, free) for v in models[:FIT_HEADERS]),
            *(asyncio.sleep(0, {'source': 'size', **_fit_from_size(v, free)}) for v in models[FIT_HEADERS:]),
        )
        fits = dict(zip([v.name for v in models], estimates, strict=True))
        return {
            'repo': repo_id,
            'revision': info['sha'],
            'gated': info['gated'],
            'variants': [{**v.as_dict(), 'fit': fits.get(v.name)} for v in found],
        }

    async def variants(self, repo_id: str, revision: str | None = None) -> tuple[str | None, list[Variant]]:
        """The repo's commit and its variants, without the fit (no header is fetched): what a download needs."""
        info = await asyncio.to_thread(self._info, repo_id, revision)
        return info['sha'], variants(info['files'])

    def _info(self, repo_id: str, revision: str | None) -> dict[str, Any]:
        self._reachable()
        with self._errors(repo_id):
            info = self._api().model_info(repo_id, revision=revision, files_metadata=True)
        files = [
            RepoFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in info.siblings or []
        ]
        return {'sha': info.sha, 'gated': bool(info.gated), 'files': files}

    # ---- fit -----------------------------------------------------------------------------------------------
    async def _fit(
        self, repo_id: str, revision: str | None, v: Variant, free: tuple[int | None, int | None]
    ) -> dict[str, Any]:
        if len(v.files) > 1:  # a split model's first header lists only its own part's tensors
            return {'source': 'size', **_fit_from_size(v, free)}
        try:
            meta = await asyncio.to_thread(self._remote_meta, repo_id, revision, v.files[0], v.size)
        except Exception as e:  # any failure here only means the size-based estimate is shown
            log.info('no header for %s/%s (%s); estimating from its size', repo_id, v.name, e)
            meta = None
        if meta is None:
            return {'source': 'size', **_fit_from_size(v, free)}
        ram_free, vram_free = free
        from core.library.fit import estimate

        fit = estimate(meta, self.library.effective_params('__hub__'), ram_free=ram_free, vram_free=vram_free)
        return {
            'source': 'header',
            'label': fit.label,
            'ram_needed_bytes': fit.ram_needed_bytes,
            'vram_needed_bytes': fit.vram_needed_bytes,
            'ctx_size': fit.ctx_size,
            'architecture': meta.architecture,
            'context_length': meta.context_length,
            'n_params': meta.n_params,
        }

    def _remote_meta(self, repo_id: str, revision: str | None, first: RepoFile, total: int | None) -> Any:
        """The GGUF header of a remote file from range requests (a growing prefix), summarised as the library
        does for local files."""
        from core.library.gguf_header import GGUFError, read_header_prefix
        from core.library.meta import TensorStats, summarise

        url = f'{self.endpoint()}/{repo_id}/resolve/{quote(revision or "main", safe="")}/{quote(first.path)}'
        headers = {'Authorization': f'Bearer {self._token()}'} if self._token() else {}
        want = HEADER_FIRST_BYTES
        with httpx.Client(follow_redirects=True, timeout=30, headers=headers) as client:
            while True:
                with client.stream('GET', url, headers={'Range': f'bytes=0-{want - 1}'}) as r:
                    if r.status_code != 206:  # a server that ignores ranges would send the whole file: not that
                        return None
                    data = b''
                    for piece in r.iter_bytes():
                        data += piece
                        if len(data) >= want:
                            break
                data = data[:want]
                size = first.size or len(data)
                try:
                    header = read_header_prefix(data, size)
                    break
                except GGUFError as e:
                    if 'truncated' not in str(e) or want >= HEADER_MAX_BYTES or len(data) < want:
                        raise
                    want *= 4
        return summarise(header.kv, TensorStats.from_header(header))

    # ---- errors --------------------------------------------------------------------------------------------
    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _translate_errors(self.endpoint(), what)


@contextlib.contextmanager
def _translate_errors(endpoint: str, what: str) -> Iterator[None]:
    """huggingface_hub's and the network's errors as `HubError`s a person can act on."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    token_hint = 'a Hugging Face token is needed: set HF_TOKEN or the hf_token setting'
    try:
        yield
    except HFValidationError as e:  # a repo id or revision that cannot be one
        raise HubError(400, str(e)) from e
    except GatedRepoError as e:
        raise HubError(403, f'{what} is gated: accept its terms on Hugging Face; {token_hint}') from e
    except RepositoryNotFoundError as e:
        if _status(e) == 401:
            raise HubError(401, f'{what} was not found or is private: {token_hint}') from e
        raise HubError(404, f'no repo {what!r} on {endpoint}') from e
    except HfHubHTTPError as e:
        status = _status(e) or 502
        if status == 401:
            raise HubError(401, f'{endpoint} refused the request: {token_hint}') from e
        if status == 429:
            raise HubError(429, f'{endpoint} is rate-limiting requests; try again in a minute') from e
        raise HubError(502, f'{endpoint} answered {status}: {e}') from e
    except Exception as e:
        # huggingface_hub 2 talks through its own copy of httpx (`httpx2`): its errors are not httpx's classes.
        if isinstance(e, OSError) or type(e).__module__.split('.')[0] in ('httpx', 'httpx2', 'httpcore', 'httpcore2'):
            raise HubError(502, f'cannot reach {endpoint}: {e}') from e
        raise


def _status(e: Exception) -> int | None:
    return getattr(getattr(e, 'response', None), 'status_code', None)


def _fit_from_size(v: Variant, free: tuple[int | None, int | None]) -> dict[str, Any]:
    """Without the header: the weights are about the file's size; whether that fits in free RAM + VRAM."""
    size = v.size or 0
    room = (free[0] or 0) + (free[1] or 0)
    label = 'unknown' if not size or not room else ('fits' if size < room * 0.9 else 'too_big')
    return {'label': label, 'ram_needed_bytes': size, 'vram_needed_bytes': 0}


def _free_memory() -> tuple[int | None, int | None]:
    from core.library.fit import free_memory

    return free_memory()
