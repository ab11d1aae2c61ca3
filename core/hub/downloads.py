"""Download jobs: GGUF files from a Hub repo into a models folder, with progress, resume and verification.

The repo's file list, sizes and SHA-256 (LFS oids) come from `huggingface_hub` (`HubService`); the bytes come over
plain range requests (httpx) so that a job can resume from what it has, be cancelled at once, and count exactly.
Each file is written to `<folder>/.lap-downloads/<job>/` (the library skips hidden folders), hashed as it arrives,
checked against its oid, and only then moved into `<folder>/<owner>_<repo>/` with one rename: nothing half-written
or unverified ever appears in the library. Jobs are kept in `downloads.json` in the data dir (written atomically);
one that was running when the app stopped resumes at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from core.fsutil import atomic_write_text
from core.hub import HubError

if TYPE_CHECKING:
    from core.events import EventBus
    from core.hub import HubService

log = logging.getLogger(__name__)

JOBS_FILE = 'downloads.json'
STAGING = '.lap-downloads'
CHUNK = 1 << 20
PROGRESS_EVERY_S = 0.5
SPACE_MARGIN_BYTES = 256 << 20  # left free on the target disk beyond the files
ACTIVE = ('queued', 'downloading')


@dataclass
class JobFile:
    path: str  # in the repo
    size: int | None
    sha256: str | None
    done: bool = False


@dataclass
class Job:
    id: str
    repo: str
    revision: str
    variant: str
    folder: str  # the models folder it goes to
    files: list[JobFile]
    state: str = 'queued'  # queued, downloading, paused, done, failed, cancelled
    error: str | None = None
    bytes_done: int = 0
    created: float = field(default_factory=time.time)
    finished: float | None = None
    speed_bps: float | None = None  # not saved: live only

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def target(self) -> Path:
        return Path(self.folder) / re.sub(r'[^A-Za-z0-9._-]', '_', self.repo.replace('/', '_'))

    @property
    def staging(self) -> Path:
        return Path(self.folder) / STAGING / self.id

    def view(self) -> dict[str, Any]:
        left = self.total - self.bytes_done
        eta = left / self.speed_bps if self.speed_bps and self.state == 'downloading' else None
        return {
            **{k: v for k, v in asdict(self).items() if k != 'speed_bps'},
            'total': self.total,
            'target': str(self.target),
            'speed_bps': self.speed_bps,
            'eta_s': round(eta, 1) if eta is not None else None,
        }


class DownloadManager:
    def __init__(
        self, config: Any, hub: HubService, bus: EventBus, data_dir: Path, on_done: Callable[[], Awaitable[Any]]
    ) -> None:
        self.config, self.hub, self.bus = config, hub, bus
        # The library rescans when a job is done: its folder watcher may miss a file renamed into a folder made a
        # moment before (inotify watches a new folder only once it has seen it created).
        self._on_done = on_done
        self.path = Path(data_dir) / JOBS_FILE
        self.jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = 0  # jobs transferring now: at most `max_downloads`, read at each start (a change applies live)
        self._turn = asyncio.Condition()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.jobs = await asyncio.to_thread(self._load)
        for job in self.jobs.values():
            if job.state in ACTIVE:  # running when the app stopped: go on from the bytes it has
                job.state = 'queued'
                self._run(job)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._save()  # the active ones stay queued: they resume at the next start

    # ---- requests ------------------------------------------------------------------------------------------
    async def add(self, repo: str, variant: str, revision: str | None = None, mmproj: bool = False) -> Job:
        """A job for one variant of `repo` (its file name, or a quantization label such as Q4_K_M), with the repo's
        projector if asked. Refused (HubError) when it is not there or would not fit on the disk."""
        commit, found = await self.hub.variants(repo, revision)
        listed = [v.as_dict() for v in found]
        chosen = _pick(listed, variant)
        files = [JobFile(f['path'], f['size'], f['sha256']) for f in chosen['files']]
        if mmproj:
            projectors = [v for v in listed if v['mmproj']]
            if not projectors:
                raise HubError(400, f'{repo} has no mmproj file')
            files += [JobFile(f['path'], f['size'], f['sha256']) for f in projectors[0]['files']]
        at = commit or revision or 'main'  # the commit: every file of the job from the same one
        for other in self.jobs.values():
            if other.state in (*ACTIVE, 'paused') and (other.repo, other.variant) == (repo, chosen['name']):
                raise HubError(409, f'{chosen["name"]} is already being downloaded (job {other.id})')
        try:
            folder = await asyncio.to_thread(self._folder)
            job = Job(secrets.token_hex(6), repo, at, chosen['name'], str(folder), files)
            await asyncio.to_thread(self._check_space, job)
        except OSError as e:
            raise HubError(507, f'cannot use the download folder: {e.strerror or e}') from e
        self.jobs[job.id] = job
        await asyncio.to_thread(self._save)
        self._publish(job)
        self._run(job)
        return job

    async def cancel(self, job_id: str) -> Job | None:
        """Stop a job and remove what it had written; a finished one is only forgotten (its files stay)."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        await self._stop_task(job_id)
        if job.state != 'done':
            job.state, job.finished = 'cancelled', time.time()
        await asyncio.to_thread(shutil.rmtree, job.staging, True)
        del self.jobs[job_id]
        self._save()
        self._publish(job)
        return job

    async def pause(self, job_id: str) -> Job | None:
        """Stop a running or queued job and keep what it has; `resume` goes on from there."""
        job = self.jobs.get(job_id)
        if job is None or job.state not in ACTIVE:
            return job
        await self._stop_task(job_id)
        job.state, job.speed_bps = 'paused', None
        self._save()
        self._publish(job)
        return job

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        async with self._turn:
            while self._running >= max(1, int(self.config.settings.max_downloads)):
                # Woken when a job ends; and each second, so that a raised max_downloads lets one start.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._turn.wait(), 1.0)
            self._running += 1
        try:
            yield
        finally:
            async with self._turn:
                self._running -= 1
                self._turn.notify_all()

    async def _stop_task(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def resume(self, job_id: str) -> Job | None:
        """Go on with a paused or failed job from the bytes it has (a failed one after, say, a network loss)."""
        job = self.jobs.get(job_id)
        if job is None or job.state not in ('paused', 'failed'):
            return job
        job.state, job.error, job.finished = 'queued', None, None
        self._save()
        self._publish(job)
        self._run(job)
        return job

    def list(self) -> list[dict[str, Any]]:
        return [j.view() for j in sorted(self.jobs.values(), key=lambda j: -j.created)]

    # ---- the work ------------------------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        self._tasks[job.id] = asyncio.create_task(self._job(job), name=f'download {job.id}')

    async def _job(self, job: Job) -> None:
        try:
            async with self._slot():
                job.state = 'downloading'
                self._publish(job)
                headers = {'Authorization': f'Bearer {t}'} if (t := self.hub._token()) else {}
                if not await asyncio.to_thread(Path(job.folder).is_dir):  # an unmounted drive: not the root disk
                    raise HubError(400, f'the models folder {job.folder} is not there (unmounted?)')
                async with httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(60, connect=10)) as client:
                    for f in job.files:
                        if not f.done:
                            await self._file(client, headers, job, f)
                # All verified: into the library together, so a split model never shows with parts missing.
                await asyncio.to_thread(_place_all, job)
                job.state, job.finished, job.speed_bps = 'done', time.time(), None
                await asyncio.to_thread(shutil.rmtree, job.staging, True)
                log.info('downloaded %s (%s) into %s', job.repo, job.variant, job.target)
                await self._on_done()
        except asyncio.CancelledError:
            raise  # cancel() or stop() decides what the job becomes
        except HubError as e:
            job.state, job.error, job.finished = 'failed', e.message, time.time()
        except Exception as e:
            log.exception('download %s failed', job.id)
            job.state, job.error, job.finished = 'failed', f'{type(e).__name__}: {e}', time.time()
        finally:
            self._tasks.pop(job.id, None)
            self._save()
            self._publish(job)

    async def _file(self, client: httpx.AsyncClient, headers: dict[str, str], job: Job, f: JobFile) -> None:
        part = job.staging / (Path(f.path).name + '.part')
        await asyncio.to_thread(part.parent.mkdir, parents=True, exist_ok=True)
        digest, have = await asyncio.to_thread(_hash_existing, part)
        if f.size is not None and have > f.size:  # longer than the file: not its bytes, start over
            await asyncio.to_thread(part.unlink, True)
            digest, have = hashlib.sha256(), 0
        job.bytes_done = sum(x.size or 0 for x in job.files if x.done) + have
        url = f'{self.hub.endpoint()}/{job.repo}/resolve/{quote(job.revision, safe="")}/{quote(f.path)}'
        if f.size is None or have < f.size:
            digest = await self._fetch(client, headers, url, job, part, digest, have)
        if f.sha256 and digest.hexdigest() != f.sha256:
            await asyncio.to_thread(part.unlink, True)  # a resume would build on bad bytes
            raise HubError(
                502, f"{f.path}: checksum mismatch (SHA-256 {digest.hexdigest()} is not the repo's {f.sha256})"
            )
        await asyncio.to_thread(os.replace, part, job.staging / Path(f.path).name)  # verified, waiting for the rest
        f.done = True
        await asyncio.to_thread(self._save)

    async def _fetch(
        self, client: httpx.AsyncClient, headers: dict[str, str], url: str, job: Job, part: Path, digest: Any, have: int
    ) -> Any:
        """Append the rest of the file to `part` (from byte `have`), hashing as it goes; the digest of all of it."""
        ranged = {**headers, 'Range': f'bytes={have}-'} if have else headers
        async with client.stream('GET', url, headers=ranged) as r:
            if r.status_code in (401, 403):
                terms = ' and its terms accepted on Hugging Face' if r.status_code == 403 else ''
                raise HubError(r.status_code, f'{job.repo} needs a Hugging Face token (HF_TOKEN or hf_token){terms}')
            if r.status_code == 404:
                raise HubError(404, f'{url} is not there (removed from the repo?)')
            if r.status_code == 429:
                raise HubError(429, 'Hugging Face is rate-limiting downloads; start the job again in a while')
            if r.status_code == 416 and have:  # nothing past what it has: the file is whole (its size was unknown)
                return digest
            if r.status_code not in (200, 206):
                raise HubError(502, f'{url} answered {r.status_code}')
            mode = 'ab'
            starts_at = _range_start(r.headers.get('content-range')) if r.status_code == 206 else 0
            if have and starts_at != have:  # the range was ignored (or another one sent): start over
                digest, mode = hashlib.sha256(), 'wb'
                job.bytes_done -= have
                if starts_at:
                    raise HubError(502, f'{url} answered from byte {starts_at}, not {have}')
            mark, mark_bytes = time.monotonic(), job.bytes_done
            out = await asyncio.to_thread(part.open, mode)
            pending: list[bytes] = []  # written in batches (one thread hop per MiB or per PROGRESS_EVERY_S)
            try:
                async for chunk in r.aiter_bytes():
                    pending.append(chunk)
                    job.bytes_done += len(chunk)
                    now = time.monotonic()
                    if sum(map(len, pending)) >= CHUNK or now - mark >= PROGRESS_EVERY_S:
                        await asyncio.to_thread(_append, out, digest, b''.join(pending))
                        pending = []
                    if now - mark >= PROGRESS_EVERY_S:
                        job.speed_bps = (job.bytes_done - mark_bytes) / (now - mark)
                        mark, mark_bytes = now, job.bytes_done
                        self._publish(job)
                if pending:
                    await asyncio.to_thread(_append, out, digest, b''.join(pending))
            finally:
                await asyncio.to_thread(out.close)
        return digest

    # ---- helpers -------------------------------------------------------------------------------------------
    def _folder(self) -> Path:
        """The download folder: `download_dir`, which must lie inside a models folder (else the model would never
        be found, and only model folders are written to), or the first models folder."""
        s = self.config.settings
        roots = [Path(d).expanduser().resolve() for d in s.models_dirs]
        if s.download_dir is None:
            if not roots:
                raise HubError(400, 'no models folder to download into: add one in Settings (models_dirs)')
            folder = roots[0]
        else:
            folder = Path(s.download_dir).expanduser().resolve()
            if not any(folder == r or r in folder.parents for r in roots):
                raise HubError(
                    400, f'download_dir {folder} is not inside a models folder ({", ".join(map(str, roots))})'
                )
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _check_space(self, job: Job) -> None:
        need = job.total + SPACE_MARGIN_BYTES
        free = shutil.disk_usage(job.folder).free
        if need > free:
            raise HubError(
                507,
                f'not enough space in {job.folder}: {job.variant} needs {_gib(job.total)} (+{_gib(SPACE_MARGIN_BYTES)} '
                f'kept free) and {_gib(free)} is free',
            )

    def _publish(self, job: Job) -> None:
        self.bus.publish('downloads', job.state, job.view())

    def _load(self) -> dict[str, Job]:
        try:
            raw = json.loads(self.path.read_text(encoding='utf-8'))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning('download jobs file %s unreadable (%s); starting with none', self.path, e)
            return {}
        jobs = {}
        for d in raw if isinstance(raw, list) else []:
            try:
                d['files'] = [JobFile(**f) for f in d['files']]
                job = Job(**{k: v for k, v in d.items() if k in Job.__dataclass_fields__})
            except (TypeError, KeyError):
                continue
            if not re.fullmatch(r'[0-9a-f]{12}', job.id):  # it names a folder that cancel removes
                continue
            jobs[job.id] = job
        return jobs

    def _save(self) -> None:
        data = [{**asdict(j), 'speed_bps': None} for j in self.jobs.values()]
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1))
        except OSError as e:  # a full disk: the jobs go on; the file catches up at the next change
            log.warning('download jobs not saved (%s)', e)


def _pick(found: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    models = [v for v in found if not v['mmproj']]
    for v in models:
        if wanted in (v['name'], Path(v['name']).name) or any(wanted == f['path'] for f in v['files']):
            return v
    by_quant = [v for v in models if (v['quant'] or '').upper() == wanted.upper()]
    if len(by_quant) == 1:
        return by_quant[0]
    names = ', '.join(sorted({v['quant'] or v['name'] for v in models})) or '(no GGUF files)'
    if by_quant:
        which = ', '.join(v['name'] for v in by_quant)
        raise HubError(400, f'{wanted} matches {len(by_quant)} models ({which}); name the file')
    raise HubError(404, f'no GGUF {wanted!r} in the repo; it has: {names}')


def _hash_existing(part: Path) -> tuple[Any, int]:
    """SHA-256 state and size of what a previous run wrote (blocking)."""
    digest = hashlib.sha256()
    have = 0
    with contextlib.suppress(FileNotFoundError), part.open('rb') as f:
        while block := f.read(CHUNK):
            digest.update(block)
            have += len(block)
    return digest, have


def _append(out: Any, digest: Any, chunk: bytes) -> None:
    out.write(chunk)
    out.flush()  # what the hash has seen is on disk: a resume after a kill hashes the same bytes
    digest.update(chunk)


def _place_all(job: Job) -> None:
    """Every verified file of the job into the models folder, one rename each (the staging folder is on the same
    file system); the projector last, so the model is there when the library pairs it."""
    job.target.mkdir(parents=True, exist_ok=True)
    for f in sorted(job.files, key=lambda f: 'mmproj' in f.path.lower()):
        name = Path(f.path).name
        staged = job.staging / name
        if staged.exists():
            os.replace(staged, job.target / name)


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes a-b/n` answer."""
    m = re.match(r'bytes (\d+)-', content_range or '')
    return int(m.group(1)) if m else None


def _gib(n: int) -> str:
    return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'
