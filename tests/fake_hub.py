"""A local Hugging Face Hub stand-in: the endpoints `huggingface_hub` calls for search, repo info and file
resolve (ETag / linked size / commit headers, range requests), over real files on disk. No machine here reaches
huggingface.co, so the app is pointed at this through its `hf_endpoint` setting.

Repos are folders of files; `private` ones answer 401 without the token, `gated` ones 403 with Hugging Face's
error code header. Every byte a resolve sends is counted per file (`served`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import free_port

COMMIT = 'c0ffee' * 6 + 'beef'  # a 40-hex commit id


@dataclass
class FakeRepo:
    repo_id: str
    folder: Path
    downloads: int = 0
    likes: int = 0
    private: bool = False
    gated: bool = False
    sizes: dict[str, int] = field(default_factory=dict)  # sizes to claim instead of the real ones
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped (their oid stays true)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob('*') if p.is_file())


@dataclass
class FakeHub:
    token: str = 'hf_test_token'
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    served: Counter[str] = field(default_factory=Counter)  # bytes sent by resolve for downloads, per "repo/file"
    probed: Counter[str] = field(default_factory=Counter)  # ... and for bounded ranges (header reads)
    base_url: str = ''
    throttle_bps: int | None = None  # stream file bodies this slowly (to stop a download half-way)
    drop: tuple[str, int] | None = None  # (file, bytes): cut that file's body there once (a network loss)

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def app(self) -> FastAPI:
        app = FastAPI()

        def denied(request: Request, repo: FakeRepo) -> Response | None:
            auth = request.headers.get('authorization', '')
            if repo.private and auth != f'Bearer {self.token}':
                return JSONResponse({'error': 'Repository not found'}, 401, headers={'X-Error-Code': 'RepoNotFound'})
            if repo.gated and auth != f'Bearer {self.token}':
                return JSONResponse(
                    {'error': 'Access to this repo is restricted'}, 403, headers={'X-Error-Code': 'GatedRepo'}
                )
            return None

        @app.get('/api/models')
        async def search(request: Request) -> Any:
            q = (request.query_params.get('search') or '').lower()
            limit = int(request.query_params.get('limit') or 1000)
            hits = [r for r in self.repos.values() if q in r.repo_id.lower() and not r.private]
            hits.sort(key=lambda r: -r.downloads)
            return [_listing(r) for r in hits[:limit]]

        async def info(request: Request, repo_id: str) -> Any:
            repo = self.repos.get(repo_id)
            if repo is None:
                return JSONResponse({'error': 'Repository not found'}, 404, headers={'X-Error-Code': 'RepoNotFound'})
            refused = denied(request, repo)
            if refused is not None:
                return refused
            siblings = []
            for p in repo.files():
                rel = p.relative_to(repo.folder).as_posix()
                size = repo.sizes.get(rel, p.stat().st_size)
                sha = hashlib.sha256(p.read_bytes()).hexdigest()
                siblings.append(
                    {'rfilename': rel, 'size': size, 'lfs': {'sha256': sha, 'size': size, 'pointerSize': 134}}
                )
            return {**_listing(repo), 'sha': COMMIT, 'siblings': siblings}

        @app.get('/api/models/{repo_id:path}/revision/{revision}')
        async def info_at(request: Request, repo_id: str, revision: str) -> Any:
            return await info(request, repo_id)

        @app.get('/api/models/{repo_id:path}')
        async def info_main(request: Request, repo_id: str) -> Any:
            return await info(request, repo_id)

        @app.api_route('/{path:path}', methods=['GET', 'HEAD'])
        async def resolve(request: Request, path: str) -> Response:
            if '/resolve/' not in path:
                return JSONResponse({'error': 'not found'}, 404)
            repo_id, rest = path.split('/resolve/', 1)
            _revision, _, filename = rest.partition('/')
            repo = self.repos.get(repo_id)
            target = repo.folder / filename if repo is not None else None
            if repo is None or target is None or not target.is_file():
                return JSONResponse({'error': 'Entry not found'}, 404, headers={'X-Error-Code': 'EntryNotFound'})
            refused = denied(request, repo)
            if refused is not None:
                return refused
            data = target.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            headers = {
                'ETag': f'"{sha}"',
                'X-Linked-Etag': f'"{sha}"',
                'X-Linked-Size': str(len(data)),
                'X-Repo-Commit': COMMIT,
                'Accept-Ranges': 'bytes',
            }
            start, end = 0, len(data) - 1
            rng = request.headers.get('range')
            if rng and rng.startswith('bytes='):
                a, _, b = rng[6:].partition('-')
                start = int(a or 0)
                end = min(int(b), len(data) - 1) if b else len(data) - 1
            if filename in repo.corrupt:
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            body = data[start : end + 1]
            if request.method == 'HEAD':
                return Response(headers={**headers, 'Content-Length': str(len(data))})
            status = 206 if rng else 200
            if rng:
                headers['Content-Range'] = f'bytes {start}-{end}/{len(data)}'
            key = f'{repo_id}/{filename}'
            if rng and not rng.rstrip().endswith('-'):  # bytes=0-N: a header read, not a download
                self.probed[key] += len(body)
                return Response(body, status, headers=headers, media_type='application/octet-stream')
            drop = None
            if self.drop is not None and self.drop[0] == filename:
                drop, self.drop = self.drop[1], None
            if self.throttle_bps is None and drop is None:
                self.served[key] += len(body)
                return Response(body, status, headers=headers, media_type='application/octet-stream')

            async def slowly() -> AsyncIterator[bytes]:
                step = 16 * 1024
                for i in range(0, len(body), step):
                    if drop is not None and i >= drop:
                        raise ConnectionResetError('the fake hub drops the connection')  # uvicorn aborts it
                    piece = body[i : i + step]
                    self.served[key] += len(piece)
                    yield piece
                    if self.throttle_bps:
                        await asyncio.sleep(step / self.throttle_bps)

            headers['Content-Length'] = str(len(body))
            return StreamingResponse(slowly(), status, headers=headers, media_type='application/octet-stream')

        return app


def _listing(repo: FakeRepo) -> dict[str, Any]:
    return {
        'id': repo.repo_id,
        'modelId': repo.repo_id,
        'downloads': repo.downloads,
        'likes': repo.likes,
        'lastModified': '2026-11-30T12:00:00.000Z',
        'private': repo.private,
        'gated': 'auto' if repo.gated else False,
        'tags': ['gguf'],
    }


@contextlib.asynccontextmanager
async def serve_hub(hub: FakeHub) -> AsyncIterator[FakeHub]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hub.app(), host='127.0.0.1', port=port, log_level='warning', lifespan='off'))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    hub.base_url = f'http://127.0.0.1:{port}'
    try:
        yield hub
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def hub_in_thread(hub: FakeHub) -> Iterator[FakeHub]:
    """The same server on a loop of its own, for tests that drive the app as a subprocess (blocking calls)."""
    started = threading.Event()
    stop: list[Any] = []

    def run() -> None:
        async def main() -> None:
            async with serve_hub(hub):
                stop.append(asyncio.get_running_loop())
                done = asyncio.Event()
                stop.append(done)
                started.set()
                await done.wait()

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True, name='fake hub')
    thread.start()
    assert started.wait(30), 'the fake hub did not start'
    try:
        yield hub
    finally:
        loop, done = stop
        loop.call_soon_threadsafe(done.set)
        thread.join(10)
