"""Finding models (issue 16, its first part): search a Hub for repos with GGUF files and open one to see its files by
quantization, split parts as one, projectors apart, with a fit read from each file's real header by range request.
Against a local Hub-compatible server (tests/fake_hub.py) serving fixture GGUFs; the app reaches it through the
`hf_endpoint` setting, with `huggingface_hub` as the client."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.hub.files import RepoFile, quant_of, variants
from tests.fake_hub import FakeHub, FakeRepo, serve_hub
from tests.serving import serve


@pytest.fixture
async def hub(tmp_path: Path, tiny_model: Path) -> AsyncIterator[FakeHub]:
    h = FakeHub()
    folder = tmp_path / 'hub' / 'tiny'
    folder.mkdir(parents=True)
    shutil.copy(tiny_model, folder / 'tiny-llama-Q8_0.gguf')
    shutil.copy(tiny_model, folder / 'tiny-llama-F16.gguf')
    data = tiny_model.read_bytes()
    half = len(data) // 2
    (folder / 'tiny-llama-Q4_K_M-00001-of-00002.gguf').write_bytes(data[:half])
    (folder / 'tiny-llama-Q4_K_M-00002-of-00002.gguf').write_bytes(data[half:])
    (folder / 'mmproj-tiny-F16.gguf').write_bytes(data[:4096])
    (folder / 'README.md').write_text('# tiny')
    h.add(FakeRepo('lap-test/tiny-llama-GGUF', folder, downloads=500, likes=7))
    other = tmp_path / 'hub' / 'other'
    other.mkdir()
    shutil.copy(tiny_model, other / 'other-Q2_K.gguf')
    h.add(FakeRepo('lap-test/other-GGUF', other, downloads=20))
    h.add(FakeRepo('lap-test/private-GGUF', other, private=True))
    h.add(FakeRepo('lap-test/gated-GGUF', other, gated=True))
    async with serve_hub(h):
        yield h


@pytest.fixture
async def app(system_factory: Any, hub: FakeHub, models_dir: Path, tiny_model: Path) -> Any:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, hf_endpoint=hub.base_url)
    async with serve(system) as s, s.client() as client:
        yield s, client


async def test_search_lists_gguf_repos_most_downloaded_first(app: Any) -> None:
    _, client = app
    r = await client.get('/api/hub/search', params={'q': 'gguf'})
    assert r.status_code == 200, r.text
    repos = r.json()['repos']
    assert [x['repo'] for x in repos] == ['lap-test/tiny-llama-GGUF', 'lap-test/other-GGUF', 'lap-test/gated-GGUF']
    assert repos[0]['downloads'] == 500 and repos[0]['likes'] == 7 and repos[0]['updated']
    assert repos[2]['gated'] is True  # a private repo is not listed to an anonymous search


async def test_a_repo_by_quantization_with_a_fit_from_the_real_header(app: Any, tiny_model: Path) -> None:
    served, client = app
    r = await client.get('/api/hub/repos/lap-test/tiny-llama-GGUF')
    assert r.status_code == 200, r.text
    body = r.json()
    by_quant = {v['quant']: v for v in body['variants'] if not v['mmproj']}
    assert set(by_quant) == {'Q8_0', 'F16', 'Q4_K_M'}  # README.md is not a model
    split = by_quant['Q4_K_M']
    assert split['parts'] == 2 and split['complete'] and split['size'] == tiny_model.stat().st_size
    assert [f['path'] for f in split['files']] == [
        'tiny-llama-Q4_K_M-00001-of-00002.gguf',
        'tiny-llama-Q4_K_M-00002-of-00002.gguf',
    ]
    assert split['fit']['source'] == 'size'
    q8 = by_quant['Q8_0']
    assert q8['files'][0]['sha256'] and q8['size'] == tiny_model.stat().st_size
    local = served.system.library.get('tiny-llama').meta
    assert q8['fit']['source'] == 'header'  # read through range requests of the file's first bytes
    assert q8['fit']['architecture'] == local.architecture and q8['fit']['n_params'] == local.n_params
    assert q8['fit']['label'] and q8['fit']['ram_needed_bytes'] > 0
    [projector] = [v for v in body['variants'] if v['mmproj']]
    assert projector['name'] == 'mmproj-tiny-F16.gguf'


async def test_refusals_say_what_to_do(app: Any, hub: FakeHub) -> None:
    served, client = app
    missing = await client.get('/api/hub/repos/lap-test/nope')
    assert missing.status_code == 404 and 'no repo' in missing.json()['detail']
    private = await client.get('/api/hub/repos/lap-test/private-GGUF')
    assert private.status_code == 401 and 'HF_TOKEN' in private.json()['detail']
    gated = await client.get('/api/hub/repos/lap-test/gated-GGUF')
    assert gated.status_code == 403 and 'gated' in gated.json()['detail']
    await served.system.save_config({'hf_token': hub.token})  # the token setting opens both
    assert (await client.get('/api/hub/repos/lap-test/private-GGUF')).status_code == 200
    assert (await client.get('/api/hub/repos/lap-test/gated-GGUF')).status_code == 200
    shown = (await client.get('/api/config')).json()['settings']['hf_token']
    assert shown == '***'  # never shown back


async def test_an_unreachable_endpoint_is_a_clear_502(system_factory: Any, models_dir: Path, tiny_model: Path) -> None:
    from tests.conftest import free_port

    system = await system_factory(models_dirs=[models_dir], hf_endpoint=f'http://127.0.0.1:{free_port()}')
    async with serve(system) as s, s.client() as client:
        r = await client.get('/api/hub/search', params={'q': 'x'})
    assert r.status_code == 502 and 'cannot reach' in r.json()['detail']


def test_quantization_labels_and_split_parts_from_names() -> None:
    names = {
        'Qwen2.5-7B-Instruct-Q4_K_M.gguf': 'Q4_K_M',
        'model.IQ2_XS.gguf': 'IQ2_XS',
        'llama-3-8b-instruct-bf16.gguf': 'BF16',
        'gpt-oss-20b-MXFP4.gguf': 'MXFP4',
        'Q8_0/model-Q8_0-00001-of-00003.gguf': 'Q8_0',
        'phi-3-mini.gguf': None,
    }
    assert {n: quant_of(n) for n in names} == names
    files = [RepoFile(f'm-Q8_0-0000{i}-of-00003.gguf', 10, None) for i in (2, 1)]  # one part missing
    [v] = variants(files)
    assert v.name == 'm-Q8_0-00001-of-00003.gguf' and v.size == 20 and not v.complete
