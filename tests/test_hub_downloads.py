"""Downloads (issue 16): a variant of a Hub repo into the models folder, checked against its SHA-256, appears in the
library by itself and serves a chat; the app killed mid-download resumes from the bytes it had; a corrupt file, a
disk too small, a token needed and a cancel each end with a clear reason and nothing half-written in the library.
Against the local Hub stand-in (tests/fake_hub.py)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import poll, start_app, stop_process, wait_for
from tests.fake_hub import FakeHub, FakeRepo, hub_in_thread, serve_hub
from tests.gguf_factory import write_mmproj_gguf, write_split_gguf
from tests.serving import serve

REPO = 'lap-test/tiny-llama-GGUF'
FILE = 'tiny-llama-Q8_0.gguf'


def _hub(tmp_path: Path, tiny_model: Path) -> FakeHub:
    h = FakeHub()
    folder = tmp_path / 'hub' / 'tiny'
    folder.mkdir(parents=True)
    shutil.copy(tiny_model, folder / FILE)
    shutil.copy(tiny_model, folder / 'tiny-llama-F16.gguf')
    write_mmproj_gguf(folder / 'mmproj-tiny-F16.gguf')
    write_split_gguf(folder, 'tiny-split-Q4_K_M', n_parts=3, name='tiny-split')
    h.add(FakeRepo(REPO, folder, downloads=10))
    h.add(FakeRepo('lap-test/private-GGUF', folder, private=True))
    return h


@pytest.fixture
async def hub(tmp_path: Path, tiny_model: Path) -> AsyncIterator[FakeHub]:
    async with serve_hub(_hub(tmp_path, tiny_model)) as h:
        yield h


@pytest.fixture
async def app(system_factory: Any, hub: FakeHub, tmp_path: Path) -> Any:
    shelf = tmp_path / 'shelf'
    shelf.mkdir()
    system = await system_factory(models_dirs=[shelf], scan_well_known_dirs=False, hf_endpoint=hub.base_url)
    async with serve(system) as s, s.client() as client:
        yield s, client, shelf


def _gguf_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*.gguf') if '.lap-downloads' not in p.parts)


async def _until(client: httpx.AsyncClient, job_id: str, *states: str, deadline_s: float = 30) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        jobs = (await client.get('/api/downloads')).json()['downloads']
        job = next((j for j in jobs if j['id'] == job_id), None)
        return job if job is not None and job['state'] in states else None

    return await wait_for(check, deadline_s)


async def test_find_download_and_chat(app: Any, hub: FakeHub, tiny_model: Path) -> None:
    served, client, shelf = app
    events = served.system.bus.queue(['downloads'])
    repos = (await client.get('/api/hub/search', params={'q': 'tiny'})).json()['repos']
    assert repos[0]['repo'] == REPO
    variants = (await client.get(f'/api/hub/repos/{REPO}')).json()['variants']
    assert {v['quant'] for v in variants if not v['mmproj']} == {'Q8_0', 'F16', 'Q4_K_M'}

    r = await client.post('/api/downloads', json={'repo': REPO, 'variant': 'Q8_0'})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job['total'] == tiny_model.stat().st_size and job['state'] in ('queued', 'downloading')
    done = await _until(client, job['id'], 'done', 'failed')
    assert done['state'] == 'done', done['error']
    assert done['bytes_done'] == done['total']
    assert _gguf_files(shelf) == [f'lap-test_tiny-llama-GGUF/{FILE}']
    assert not (shelf / '.lap-downloads' / job['id']).exists()
    states = []
    while not events.queue.empty():  # type: ignore[union-attr]
        states.append((await events.get()).type)
    assert states[0] == 'queued' and 'downloading' in states and states[-1] == 'done'

    # It appears in the library by itself (the folder watcher) and serves a chat.
    library = served.system.library
    entry = await wait_for(lambda: next((e for e in library.models() if e.path.name == FILE), None), 20)
    chat = {'model': entry.id, 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 3}
    answer = await client.post('/v1/chat/completions', json=chat)
    assert answer.status_code == 200, answer.text

    # A vision model's projector comes along when asked, and the library pairs it with the model.
    job = (await client.post('/api/downloads', json={'repo': REPO, 'variant': 'F16', 'mmproj': True})).json()
    assert (await _until(client, job['id'], 'done', 'failed'))['state'] == 'done'
    f16 = await wait_for(
        lambda: next((e for e in library.models() if e.path.name == 'tiny-llama-F16.gguf' and e.mmproj), None), 20
    )
    assert f16.mmproj.name == 'mmproj-tiny-F16.gguf'


async def test_corrupt_bytes_fail_the_checksum_and_nothing_lands(app: Any, hub: FakeHub) -> None:
    _, client, shelf = app
    hub.repos[REPO].corrupt.add(FILE)
    job = (await client.post('/api/downloads', json={'repo': REPO, 'variant': FILE})).json()
    failed = await _until(client, job['id'], 'failed', 'done')
    assert failed['state'] == 'failed' and 'checksum mismatch' in failed['error']
    assert _gguf_files(shelf) == [] and not list((shelf / '.lap-downloads').rglob('*.part'))


async def test_refused_up_front_when_it_cannot_fit(app: Any, hub: FakeHub) -> None:
    _, client, _ = app
    hub.repos[REPO].sizes[FILE] = 1 << 50  # a petabyte
    r = await client.post('/api/downloads', json={'repo': REPO, 'variant': 'Q8_0'})
    assert r.status_code == 507 and 'not enough space' in r.json()['detail'] and 'free' in r.json()['detail']
    assert (await client.get('/api/downloads')).json()['downloads'] == []


async def test_a_token_is_asked_for_and_unknown_variants_are_named(app: Any) -> None:
    _, client, _ = app
    r = await client.post('/api/downloads', json={'repo': 'lap-test/private-GGUF', 'variant': 'Q8_0'})
    assert r.status_code == 401 and 'HF_TOKEN' in r.json()['detail']
    r = await client.post('/api/downloads', json={'repo': REPO, 'variant': 'Q3_K_S'})
    assert r.status_code == 404 and 'F16' in r.json()['detail'] and 'Q4_K_M' in r.json()['detail']
    r = await client.post('/api/downloads', json={'repo': '../etc', 'variant': 'x'})
    assert r.status_code == 422  # field errors as elsewhere
    r = await client.get('/api/hub/repos/x/-bad-')
    assert r.status_code == 400


async def test_cancel_removes_the_partial_file(app: Any, hub: FakeHub) -> None:
    _, client, shelf = app
    hub.throttle_bps = 64 * 1024  # ~9 s for the file
    job = (await client.post('/api/downloads', json={'repo': REPO, 'variant': FILE})).json()
    await wait_for(lambda: hub.served[f'{REPO}/{FILE}'] > 64 * 1024, 20)
    r = await client.delete(f'/api/downloads/{job["id"]}')
    assert r.status_code == 200 and r.json()['state'] == 'cancelled'
    assert not (shelf / '.lap-downloads' / job['id']).exists() and _gguf_files(shelf) == []
    assert (await client.get('/api/downloads')).json()['downloads'] == []


def test_the_app_killed_mid_download_resumes_from_what_it_had(tmp_path: Path, tiny_model: Path) -> None:
    hub = _hub(tmp_path, tiny_model)
    hub.throttle_bps = 64 * 1024
    shelf = tmp_path / 'shelf'
    shelf.mkdir()
    size = tiny_model.stat().st_size
    key = f'{REPO}/{FILE}'
    with hub_in_thread(hub):
        env = {'LAP_HF_ENDPOINT': hub.base_url}
        app = start_app(tmp_path, '--models-dir', str(shelf), env=env)
        try:
            r = httpx.post(f'{app.base_url}/api/downloads', json={'repo': REPO, 'variant': FILE}, timeout=30)
            assert r.status_code == 201, r.text
            job_id = r.json()['id']
            poll(lambda: hub.served[key] > size // 3, 30, 'the download did not start')
            os.killpg(app.proc.pid, signal.SIGKILL)
            app.proc.wait(10)
        finally:
            stop_process(app.proc)
        part = shelf / '.lap-downloads' / job_id / f'{FILE}.part'
        had = part.stat().st_size
        assert 0 < had < size
        served_before = hub.served[key]
        hub.throttle_bps = None

        again = start_app(tmp_path, '--models-dir', str(shelf), env=env)  # same data dir: the job is there
        try:

            def finished() -> dict[str, Any] | None:
                jobs = httpx.get(f'{again.base_url}/api/downloads', timeout=10).json()['downloads']
                return next((j for j in jobs if j['id'] == job_id and j['state'] in ('done', 'failed')), None)

            job = poll(finished, 30, 'the download did not resume')
            assert job['state'] == 'done', job['error']
        finally:
            stop_process(again.proc)
    assert hub.served[key] - served_before == size - had  # only the rest was fetched
    assert (shelf / 'lap-test_tiny-llama-GGUF' / FILE).read_bytes() == tiny_model.read_bytes()


async def test_pause_keeps_the_bytes_and_resume_fetches_only_the_rest(app: Any, hub: FakeHub, tiny_model: Path) -> None:
    _, client, shelf = app
    hub.throttle_bps = 64 * 1024
    key = f'{REPO}/{FILE}'
    job = (await client.post('/api/downloads', json={'repo': REPO, 'variant': FILE})).json()
    await wait_for(lambda: hub.served[key] > 128 * 1024, 20)
    paused = (await client.post(f'/api/downloads/{job["id"]}/pause')).json()
    assert paused['state'] == 'paused'
    part = shelf / '.lap-downloads' / job['id'] / f'{FILE}.part'
    had = part.stat().st_size
    assert had > 0 and _gguf_files(shelf) == []
    before = hub.served[key]
    hub.throttle_bps = None
    assert (await client.post(f'/api/downloads/{job["id"]}/resume')).json()['state'] == 'queued'
    done = await _until(client, job['id'], 'done', 'failed')
    assert done['state'] == 'done', done['error']
    assert hub.served[key] - before == tiny_model.stat().st_size - had
    assert (shelf / 'lap-test_tiny-llama-GGUF' / FILE).read_bytes() == tiny_model.read_bytes()


async def test_a_split_model_comes_whole_and_a_network_loss_is_resumed(app: Any, hub: FakeHub) -> None:
    """All three parts, verified, land together and load as one model. The connection drops during the second
    part: the job fails with the reason and keeps what it had; resumed, it fetches only the rest."""
    served, client, shelf = app
    variants = (await client.get(f'/api/hub/repos/{REPO}')).json()['variants']
    [split] = [v for v in variants if v['parts'] == 3]
    assert split['complete'] and split['quant'] == 'Q4_K_M' and split['name'].endswith('-00001-of-00003.gguf')
    second = split['files'][1]['path']
    hub.drop = (second, 16 * 1024)
    job = (await client.post('/api/downloads', json={'repo': REPO, 'variant': split['name']})).json()
    failed = await _until(client, job['id'], 'failed', 'done')
    assert failed['state'] == 'failed', failed
    assert failed['error'] and _gguf_files(shelf) == []  # a part missing: nothing in the library
    staged = {p.name: p.stat().st_size for p in (shelf / '.lap-downloads' / job['id']).iterdir()}
    assert staged[Path(split['files'][0]['path']).name] == split['files'][0]['size']  # verified, waiting
    had = staged.get(Path(second).name + '.part', 0)
    before = hub.served[f'{REPO}/{second}']
    resumed = (await client.post(f'/api/downloads/{job["id"]}/resume')).json()
    assert resumed['state'] == 'queued'
    done = await _until(client, job['id'], 'done', 'failed')
    assert done['state'] == 'done', done['error']
    assert len(_gguf_files(shelf)) == 3
    assert hub.served[f'{REPO}/{second}'] - before == split['files'][1]['size'] - had  # only the rest
    entry = await wait_for(lambda: next((e for e in served.system.library.models() if len(e.paths) == 3), None), 20)
    assert entry.error is None


async def test_max_downloads_holds_jobs_back_and_a_raise_applies_live(app: Any, hub: FakeHub) -> None:
    served, client, _ = app
    hub.throttle_bps = 64 * 1024
    await served.system.save_config({'max_downloads': 1})
    first = (await client.post('/api/downloads', json={'repo': REPO, 'variant': 'Q8_0'})).json()
    second = (await client.post('/api/downloads', json={'repo': REPO, 'variant': 'F16'})).json()
    await _until(client, first['id'], 'downloading')
    assert (await _until(client, second['id'], 'queued'))['bytes_done'] == 0  # waits its turn
    await served.system.save_config({'max_downloads': 2})
    await _until(client, second['id'], 'downloading', deadline_s=10)  # no need to wait for the first
    hub.throttle_bps = None
    for job in (first, second):
        assert (await _until(client, job['id'], 'done', 'failed'))['state'] == 'done'
