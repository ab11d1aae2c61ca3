"""/api/models through the FastAPI app on a real System: shapes, values, 404, rescan, OpenAPI schema."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from core.api import models as models_api
from tests.gguf_factory import CHATML, write_mmproj_gguf, write_split_gguf, write_tiny_gguf


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / 'models'
    (root / 'vis').mkdir(parents=True)
    write_tiny_gguf(root / 'tiny-llama.gguf', name='tiny-llama', seed=1)
    write_tiny_gguf(root / 'vis' / 'seeing.gguf', name='Seeing', quant='q8_0')
    write_mmproj_gguf(root / 'vis' / 'mmproj-seeing.gguf')
    write_split_gguf(root, 'parted', 2)
    (root / 'broken.gguf').write_bytes(b'GGUF\x03\x00\x00\x00' + b'\xff' * 16)
    (root / 'notes.bin').write_bytes(b'just text')
    return root


@pytest.fixture
async def client(system_factory, folder: Path):
    system = await system_factory(models_dirs=[str(folder)], scan_well_known_dirs=False)
    app = FastAPI()
    app.include_router(models_api.router)
    app.state.system = system
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://test') as c:
        c.system = system  # type: ignore[attr-defined]
        yield c


async def test_list_models(client: httpx.AsyncClient, folder: Path):
    r = await client.get('/api/models')
    assert r.status_code == 200
    body = r.json()
    by_id = {m['id']: m for m in body['models']}
    assert sorted(by_id) == ['broken', 'parted', 'seeing', 'tiny-llama']

    tiny = by_id['tiny-llama']
    assert tiny['aliases'] == ['tiny-llama.gguf']
    assert tiny['path'] == str(folder / 'tiny-llama.gguf') and tiny['paths'] == [tiny['path']]
    assert tiny['size_bytes'] == (folder / 'tiny-llama.gguf').stat().st_size
    assert tiny['meta']['architecture'] == 'llama' and tiny['meta']['file_type'] == 'F32'
    assert tiny['meta']['context_length'] == 2048 and tiny['meta']['n_params'] > 0
    assert tiny['capabilities'] == ['completion', 'chat']
    assert tiny['status'] == 'stopped' and tiny['pid'] is None and tiny['inflight'] == 0
    assert tiny['error'] is None
    fit = tiny['fit']
    assert fit['label'] in ('fits', 'tight', 'does not fit')
    assert fit['ctx_size'] == 2048 and fit['kv_bytes'] == 2 * 2 * 2048 * 2 * 16 * 2
    assert fit['ram_free_bytes'] > 0

    assert by_id['seeing']['mmproj'] == str(folder / 'vis' / 'mmproj-seeing.gguf')
    assert 'vision' in by_id['seeing']['capabilities'] and by_id['seeing']['meta']['file_type'] == 'Q8_0'
    assert len(by_id['parted']['paths']) == 2
    assert 'invalid GGUF' in by_id['broken']['error'] and by_id['broken']['fit'] is None

    scan = body['scan']
    assert scan['roots'] == [str(folder)] and scan['models'] == 4
    assert scan['skipped'] == [{'path': str(folder / 'notes.bin'), 'reason': '.bin file without the GGUF magic'}]


async def test_model_detail(client: httpx.AsyncClient):
    r = await client.get('/api/models/tiny-llama.gguf')  # aliases work too
    assert r.status_code == 200
    d = r.json()
    assert d['id'] == 'tiny-llama'
    md = d['metadata']
    assert md['general.name'] == 'tiny-llama' and md['llama.block_count'] == 2
    assert md['tokenizer.ggml.tokens'] == {'array': 'STRING', 'length': 512}
    assert md['tokenizer.chat_template'] == {'string': 'chat template', 'length': len(CHATML)}
    assert d['chat_template'] is None
    assert d['meta']['tensor_count'] == 3 + 2 * 9 == sum(d['tensor_types'].values())
    assert d['tensor_types'] == {'F32': 21}
    assert len(d['layer_bytes']) == 2

    d = (await client.get('/api/models/tiny-llama', params={'chat_template': 'true'})).json()
    assert d['chat_template'] == CHATML == d['metadata']['tokenizer.chat_template']

    r = await client.get('/api/models/no-such-model')
    assert r.status_code == 404 and 'no-such-model' in r.json()['detail']


async def test_rescan_picks_up_changes(client: httpx.AsyncClient, folder: Path):
    (folder / 'broken.gguf').unlink()
    write_tiny_gguf(folder / 'fresh.gguf', name='fresh')
    r = await client.post('/api/models/rescan')
    assert r.status_code == 200
    scan = r.json()
    assert 'fresh' in scan['added'] and 'broken' in scan['removed']
    assert scan['files_read'] >= 1 and scan['duration_s'] >= 0
    ids = [m['id'] for m in (await client.get('/api/models')).json()['models']]
    assert 'fresh' in ids and 'broken' not in ids


async def test_openapi_schema_names_the_models(client: httpx.AsyncClient):
    app = FastAPI()
    app.include_router(models_api.router)
    schema = app.openapi()
    names = set(schema['components']['schemas'])
    assert {'ModelsOut', 'ModelOut', 'ModelDetailOut', 'FitEstimate', 'ScanOut', 'ModelMetaOut'} <= names
    fit_props = schema['components']['schemas']['FitEstimate']['properties']
    assert {'label', 'kv_bytes', 'weights_gpu_bytes', 'vram_free_bytes'} <= set(fit_props)
