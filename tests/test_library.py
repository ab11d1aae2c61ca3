"""ModelLibrary over generated folders: discovery, metadata, splits, projectors, bad files, the SQLite cache,
events, the folder watcher and settings changes."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from core.events import Event, EventBus
from core.library import ModelLibrary
from core.library.discovery import well_known_dirs
from core.store import Store
from tests.gguf_factory import write_mmproj_gguf, write_split_gguf, write_tiny_gguf

MakeLibrary = Callable[..., Any]


@pytest.fixture
async def make_library(settings_factory, tmp_path: Path) -> AsyncIterator[MakeLibrary]:
    """Start a ModelLibrary on its own settings, store and bus; stopped after the test."""
    started: list[ModelLibrary] = []
    stores: list[Store] = []

    async def make(dirs: list[Path], *, store_path: Path | None = None, start: bool = True, **settings: Any):
        settings.setdefault('scan_well_known_dirs', False)
        config = settings_factory(**settings)
        config.update({'models_dirs': [str(d) for d in dirs]})  # saved, not CLI, so later updates apply
        bus = EventBus()
        bus.attach_loop(asyncio.get_running_loop())
        store = Store(store_path or tmp_path / 'lib.sqlite3')
        stores.append(store)
        lib = ModelLibrary(config, store, bus)
        if start:
            await lib.start()
            started.append(lib)
        return lib

    yield make
    for lib in started:
        await lib.stop()
    for store in stores:
        store.close()


async def next_library_event(queue: Any, predicate: Callable[[dict[str, Any]], bool], deadline_s: float = 5) -> Event:
    async def wait() -> Event:
        while True:
            event = await queue.get()
            if event.type == 'library' and predicate(event.data):
                return event

    return await asyncio.wait_for(wait(), deadline_s)


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """A folder with the shapes users have: quants, a split, a projector pair, links, and bad files."""
    root = tmp_path / 'zoo'
    (root / 'nested' / 'deeper').mkdir(parents=True)
    write_tiny_gguf(root / 'tiny-f16.gguf', name='Tiny F16', quant='f16', seed=3)
    write_tiny_gguf(root / 'nested' / 'deeper' / 'tiny-q8.gguf', name='Tiny Q8', quant='q8_0', file_type_label=False)
    write_split_gguf(root / 'nested', 'splitty', 3, name='Splitty')
    (root / 'vision').mkdir()
    write_tiny_gguf(root / 'vision' / 'seeing-model.gguf', name='Seeing')
    write_mmproj_gguf(root / 'vision' / 'mmproj-seeing-f16.gguf')
    write_tiny_gguf(root / 'renamed.bin', name='Bin Model')  # GGUF inside a .bin
    (root / 'pytorch_model.bin').write_bytes(b'PK\x03\x04 not gguf at all')
    (root / 'bad-magic.gguf').write_bytes(b'GGML' + bytes(64))
    raw = (root / 'tiny-f16.gguf').read_bytes()
    (root / 'truncated.gguf').write_bytes(raw[: len(raw) // 3])
    (root / 'empty.gguf').write_bytes(b'')
    os.mkfifo(root / 'pipe.gguf')
    (root / 'dangling.gguf').symlink_to(root / 'gone.gguf')
    (root / 'link-to-f16.gguf').symlink_to(root / 'tiny-f16.gguf')  # the same file twice: listed once
    (root / '.hidden').mkdir()
    write_tiny_gguf(root / '.hidden' / 'secret.gguf')
    return root


async def test_scan_lists_models_with_metadata_and_clear_errors(make_library: MakeLibrary, zoo: Path):
    lib = await asyncio.wait_for(make_library([zoo]), 20)
    by_id = {e.id: e for e in lib.models()}
    assert set(by_id) == {
        'tiny-f16',
        'tiny-q8',
        'splitty',
        'seeing-model',
        'renamed',
        'bad-magic',
        'truncated',
        'empty',
        'dangling',
    }

    f16 = by_id['tiny-f16']
    assert f16.meta.file_type == 'F16' and f16.meta.name == 'Tiny F16' and f16.meta.architecture == 'llama'
    assert f16.meta.context_length == 2048 and f16.meta.block_count == 2 and f16.meta.embedding_length == 64
    assert f16.meta.head_count == 4 and f16.meta.head_count_kv == 2 and f16.meta.vocab_size == 512
    assert f16.meta.tokenizer_model == 'llama' and f16.meta.has_chat_template
    assert f16.capabilities == ['completion', 'chat'] and f16.error is None and f16.mmproj is None
    assert f16.size_bytes == (zoo / 'tiny-f16.gguf').stat().st_size
    assert f16.aliases == ['tiny-f16.gguf']
    assert f16.meta['file_type'] == f16.meta.get('file_type') == 'F16'
    assert by_id['tiny-q8'].meta.file_type == 'Q8_0'  # no general.file_type: from the tensor types

    split = by_id['splitty']
    assert [p.name for p in split.paths] == [f'splitty-0000{i}-of-00003.gguf' for i in (1, 2, 3)]
    assert split.size_bytes == sum(p.stat().st_size for p in split.paths)
    assert split.meta.n_params == f16.meta.n_params  # same shapes, tensors summed over all parts
    assert split.meta.tensor_count == f16.meta.tensor_count
    assert split.error is None and split.meta.name == 'Splitty'

    seeing = by_id['seeing-model']
    assert seeing.mmproj == zoo / 'vision' / 'mmproj-seeing-f16.gguf'
    assert seeing.capabilities == ['completion', 'chat', 'vision']
    assert by_id['renamed'].meta.name == 'Bin Model'

    errors = {i: by_id[i].error or '' for i in ('bad-magic', 'truncated', 'empty', 'dangling')}
    assert 'bad magic' in errors['bad-magic']
    assert 'truncated' in errors['truncated']
    assert 'too short' in errors['empty']
    assert 'broken symlink' in errors['dangling']
    assert all(by_id[i].capabilities == [] for i in errors)

    skipped = {Path(s['path']).name: s['reason'] for s in lib.last_scan.skipped}
    assert skipped == {
        'pytorch_model.bin': '.bin file without the GGUF magic',
        'pipe.gguf': 'not a regular file (FIFO, device, ...)',  # skipped without opening: a read would block
    }
    assert lib.last_scan.dir_errors == []
    assert not any('secret' in str(p) for e in lib.models() for p in e.paths)


async def test_links_out_of_the_model_folders_are_not_followed(make_library: MakeLibrary, tmp_path: Path):
    models, elsewhere = tmp_path / 'models', tmp_path / 'elsewhere'
    models.mkdir(), elsewhere.mkdir()
    write_tiny_gguf(elsewhere / 'outside.gguf', name='Outside')
    write_tiny_gguf(models / 'inside.gguf', name='Inside')
    (models / 'passwd.gguf').symlink_to('/etc/passwd')
    (models / 'outside-link.gguf').symlink_to(elsewhere / 'outside.gguf')
    (models / 'linked-folder').symlink_to(elsewhere, target_is_directory=True)
    (models / 'inside-link.gguf').symlink_to(models / 'inside.gguf')  # a link within the folder is fine
    lib = await make_library([models])
    assert [e.id for e in lib.models()] == ['inside']
    skipped = {Path(s['path']).name: s['reason'] for s in lib.last_scan.skipped}
    assert skipped == {
        'passwd.gguf': 'a link to outside the model folders',
        'outside-link.gguf': 'a link to outside the model folders',
        'linked-folder': 'a link to outside the model folders',
    }
    assert 'magic' not in str(lib.last_scan)  # the target is never read, so none of its bytes can show
    # Both folders configured: the same links now point inside, and the model is listed (once).
    lib2 = await make_library([models, elsewhere])
    assert sorted(e.id for e in lib2.models()) == ['inside', 'outside']


async def test_lookup_by_id_and_aliases(make_library: MakeLibrary, zoo: Path):
    lib = await make_library([zoo])
    f16 = lib.get('tiny-f16')
    assert f16 is not None
    assert lib.get('tiny-f16.gguf') is f16
    assert lib.get('TINY-F16') is f16
    assert lib.get('splitty-00001-of-00003.gguf') is lib.get('splitty')
    assert lib.get('mmproj-seeing-f16') is None  # projectors are not models
    assert lib.get('nope') is None


async def test_ids_stay_unique_and_url_safe(make_library: MakeLibrary, tmp_path: Path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir(), b.mkdir()
    write_tiny_gguf(a / 'Same Name (v2).gguf', name='one', seed=1)
    write_tiny_gguf(b / 'Same Name (v2).gguf', name='two', seed=2)
    write_tiny_gguf(a / 'model.gguf', name='Generic Llama', quant='q8_0')
    lib = await make_library([a, b])
    ids = [e.id for e in lib.models()]
    assert sorted(ids) == ['generic-llama-q8_0', 'same-name-v2', 'same-name-v2-b']
    assert lib.get('same-name-v2').meta.name == 'one'  # path order decides, so ids are stable
    assert lib.get('same-name-v2-b').meta.name == 'two'
    assert lib.get('Same Name (v2)') is lib.get('same-name-v2')


async def test_split_model_with_a_missing_part_is_an_error(make_library: MakeLibrary, tmp_path: Path):
    (tmp_path / 'm').mkdir()
    parts = write_split_gguf(tmp_path / 'm', 'broken', 3)
    parts[1].unlink()
    lib = await make_library([tmp_path / 'm'])
    [entry] = lib.models()
    assert entry.id == 'broken'
    assert entry.error == 'split model is missing part(s) 2 of 3'
    assert len(entry.paths) == 2


async def test_missing_and_non_folder_dirs_are_reported(make_library: MakeLibrary, tmp_path: Path, zoo: Path):
    lib = await make_library([tmp_path / 'does-not-exist', zoo / 'tiny-f16.gguf', zoo])
    errors = {Path(d['path']).name: d['error'] for d in lib.last_scan.dir_errors}
    assert 'cannot open folder' in errors['does-not-exist']
    assert errors['tiny-f16.gguf'] == 'not a folder'
    assert lib.get('tiny-f16') is not None


async def test_warm_scan_reads_nothing_unchanged(make_library: MakeLibrary, zoo: Path, tmp_path: Path):
    store = tmp_path / 'shared.sqlite3'
    cold = await make_library([zoo], store_path=store)
    assert cold.last_scan.files_read >= 10
    warm = await make_library([zoo], store_path=store)
    assert warm.last_scan.files_read == 0
    assert [(e.id, e.meta, e.error) for e in warm.models()] == [(e.id, e.meta, e.error) for e in cold.models()]

    q = warm.bus.queue(['models'])
    f16 = zoo / 'tiny-f16.gguf'
    write_tiny_gguf(f16, name='Tiny F16 v2', quant='f16', seed=9)
    report = await warm.rescan()
    assert report.files_read == 1 and report.changed == ['tiny-f16'] and report.added == report.removed == []
    event = await next_library_event(q, lambda d: 'tiny-f16' in d['changed'])
    assert event.topic == 'models'
    assert warm.get('tiny-f16').meta.name == 'Tiny F16 v2'
    assert (await warm.rescan()).files_read == 0


async def test_watcher_reports_added_replaced_and_removed_files(make_library: MakeLibrary, tmp_path: Path):
    folder = tmp_path / 'watched'
    folder.mkdir()
    write_tiny_gguf(folder / 'first.gguf', name='first')
    lib = await make_library([folder])
    assert lib.watching == [folder]
    q = lib.bus.queue(['models'])

    staging = tmp_path / 'staging'
    staging.mkdir()
    write_tiny_gguf(staging / 'second.gguf', name='second')
    shutil.move(staging / 'second.gguf', folder / 'second.gguf')
    await next_library_event(q, lambda d: d['added'] == ['second'])
    assert lib.get('second').meta.name == 'second'

    write_tiny_gguf(staging / 'new.gguf', name='second, replaced', quant='f16')
    os.replace(staging / 'new.gguf', folder / 'second.gguf')
    await next_library_event(q, lambda d: d['changed'] == ['second'])
    assert lib.get('second').meta.file_type == 'F16'

    (folder / 'first.gguf').unlink()
    event = await next_library_event(q, lambda d: d['removed'] == ['first'])
    assert event.data['count'] == 1
    assert lib.get('first') is None


async def test_changing_models_dirs_rescans_and_rewatches(make_library: MakeLibrary, tmp_path: Path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    one.mkdir(), two.mkdir()
    write_tiny_gguf(one / 'm1.gguf')
    write_tiny_gguf(two / 'm2.gguf')
    lib = await make_library([one])
    q = lib.bus.queue(['models'])
    await asyncio.to_thread(lib.config.update, {'models_dirs': [str(two)]})
    event = await next_library_event(q, lambda d: d['added'] == ['m2'])
    assert event.data['removed'] == ['m1']
    write_tiny_gguf(tmp_path / 'm3.gguf')
    shutil.move(tmp_path / 'm3.gguf', two / 'm3.gguf')
    await next_library_event(q, lambda d: d['added'] == ['m3'])
    assert lib.watching == [two]


async def test_well_known_caches(make_library: MakeLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """HF hub snapshots are links into blobs/; llama.cpp's cache is a plain folder; both can be turned off."""
    hub = tmp_path / 'hf' / 'hub'
    repo = hub / 'models--org--Tiny-GGUF'
    (repo / 'blobs').mkdir(parents=True)
    blob = write_tiny_gguf(repo / 'blobs' / 'a1b2c3', name='from hf', quant='q8_0')
    for rev in ('rev1', 'rev2'):  # the same blob in two snapshots is one model
        (repo / 'snapshots' / rev).mkdir(parents=True)
        (repo / 'snapshots' / rev / 'tiny-Q8_0.gguf').symlink_to(Path('../../blobs/a1b2c3'))
    llama_cache = tmp_path / 'llama-cache'
    llama_cache.mkdir()
    write_tiny_gguf(llama_cache / 'org_repo_tiny.gguf', name='from llama.cpp')
    home = tmp_path / 'home'
    (home / '.lmstudio' / 'models' / 'pub' / 'repo').mkdir(parents=True)
    write_tiny_gguf(home / '.lmstudio' / 'models' / 'pub' / 'repo' / 'lms.gguf', name='from lm studio')
    monkeypatch.setenv('HF_HUB_CACHE', str(hub))
    monkeypatch.setenv('LLAMA_CACHE', str(llama_cache))
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
    assert well_known_dirs() == [hub, llama_cache, home / '.lmstudio' / 'models']

    lib = await make_library([], scan_well_known_dirs=True)
    names = {e.id: e.meta.name for e in lib.models()}
    assert names == {'tiny-q8_0': 'from hf', 'org_repo_tiny': 'from llama.cpp', 'lms': 'from lm studio'}
    hf = lib.get('tiny-Q8_0.gguf')
    assert hf.path.parent.parent.name == 'snapshots' and hf.path.resolve() == blob

    off = await make_library([], scan_well_known_dirs=False, store_path=tmp_path / 'other.sqlite3')
    assert off.models() == []


async def test_large_cold_scan_in_worker_processes_matches_in_process(
    make_library: MakeLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import core.library.library as library_module

    many = tmp_path / 'many'
    many.mkdir()
    n = library_module.PROCESS_SCAN_MIN_FILES + 6
    for i in range(n):
        write_tiny_gguf(many / f'm{i:03d}.gguf', name=f'm{i}', seed=i, quant='q8_0' if i % 2 else 'f16')
    (many / 'broken.gguf').write_bytes(b'GGUF' + b'\x03\x00\x00\x00' + b'\xff' * 8)
    pooled = await make_library([many], store_path=tmp_path / 'pooled.sqlite3')
    assert 'process pool scan failed' not in caplog.text  # the forked workers did the reading
    monkeypatch.setattr(library_module, 'PROCESS_SCAN_MIN_FILES', 10**9)
    inline = await make_library([many], store_path=tmp_path / 'inline.sqlite3')
    assert pooled.last_scan.files_read == inline.last_scan.files_read == n + 1
    by_id = {e.id: e for e in inline.models()}
    assert len(by_id) == n + 1
    for e in pooled.models():
        assert (e.error, e.meta, e.capabilities) == (by_id[e.id].error, by_id[e.id].meta, by_id[e.id].capabilities)
    assert pooled.get('m007').meta.file_type == 'Q8_0' and pooled.get('m008').meta.file_type == 'F16'
    assert 'invalid GGUF' in (pooled.get('broken').error or '')
