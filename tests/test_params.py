"""Launch parameters: every field maps to a flag the real llama-server accepts; bad values are field errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi import FastAPI

from core.api import models_control, parameters
from core.llama_binary import BinaryResolver, LlamaBinary
from core.model_params import ModelParams, effective_params
from core.settings import Settings
from core.supervisor.argv import (
    NOT_FLAGS,
    SWITCH_FLAGS,
    VALUE_FLAGS,
    ArgvError,
    LaunchSpec,
    accepted_flags,
    check_extra_args,
    params_args,
)
from tests.supervisor_helpers import FakeLibrary, direct, make_harness

EVERY_FIELD = ModelParams(
    ctx_size=512,
    threads=1,
    threads_batch=1,
    batch_size=64,
    ubatch_size=32,
    parallel=2,
    n_gpu_layers=-1,
    main_gpu=0,
    split_mode='layer',
    tensor_split=[3, 1],
    flash_attn='off',
    rpc=['127.0.0.1:50052', '10.0.0.7:50052'],
    cache_type_k='q8_0',
    cache_type_v='f16',
    mlock=True,
    no_mmap=True,
    rope_scaling='linear',
    rope_scale=1.0,
    rope_freq_base=10000.0,
    rope_freq_scale=1.0,
    yarn_orig_ctx=0,
    embeddings=True,
    pooling='mean',
    jinja=True,
    chat_template='chatml',
    chat_template_file=Path('/tmp/template.jinja'),
    mmproj=Path('/tmp/mmproj.gguf'),
    alias='tiny,tiny-alias',
    extra_args=['--temp', '0.5', '--seed', '-1'],
    env={'OMP_NUM_THREADS': '1'},
    ttl=60,
    pinned=True,
    preload=True,
    aliases=['house-model'],
)


@pytest.fixture(scope='module')
def help_text(llama_binary: LlamaBinary, tmp_path_factory: pytest.TempPathFactory) -> str:
    class _Config:
        settings = Settings()

    return BinaryResolver(_Config(), tmp_path_factory.mktemp('help')).help_text()


def test_every_field_is_mapped() -> None:
    mapped = set(VALUE_FLAGS) | set(SWITCH_FLAGS) | NOT_FLAGS
    assert set(ModelParams.model_fields) == mapped
    assert all(getattr(EVERY_FIELD, f) is not None for f in ModelParams.model_fields if f != 'request')


def test_every_field_maps_to_a_flag_the_binary_accepts(help_text: str) -> None:
    flags = accepted_flags(help_text)
    assert {'--ctx-size', '-c', '--port', '--metrics'} <= flags
    args = params_args(EVERY_FIELD, flags)
    emitted = [a for a in args if a.startswith('-') and not a.lstrip('-').replace('.', '').isdigit()]
    assert emitted and all(a in flags for a in emitted), set(emitted) - flags
    assert args[args.index('--n-gpu-layers') + 1] == 'all'
    assert args[args.index('--tensor-split') + 1] == '3,1'
    assert args[args.index('--rpc') + 1] == '127.0.0.1:50052,10.0.0.7:50052'
    # This build replaced --mlock/--no-mmap with --load-mode; either way the flag exists.
    assert '--mlock' in args or args[args.index('--load-mode') + 1] == 'mlock'
    argv = LaunchSpec(Path('llama-server'), Path('m.gguf'), EVERY_FIELD.mmproj, EVERY_FIELD).argv(1234, help_text)
    assert argv[-4:] == ['--temp', '0.5', '--seed', '-1']
    assert argv[argv.index('--port') + 1] == '1234' and argv[argv.index('--host') + 1] == '127.0.0.1'


def test_flag_missing_from_the_binary_is_a_clear_error() -> None:
    flags = frozenset({'--ctx-size', '--port'})
    with pytest.raises(ArgvError, match='threads') as exc:
        params_args(ModelParams(ctx_size=1, threads=2), flags)
    assert exc.value.field == 'threads'


@pytest.mark.parametrize(
    ('extra', 'message'),
    [
        (['--no-such-flag'], 'not among the flags that are safe'),
        (['--port', '9'], '--port is not allowed here: set by the supervisor'),
        (['-m', 'other.gguf'], '-m is not allowed here: set by the supervisor'),
        (['--grp-attn-w'], 'does not accept --grp-attn-w'),  # an allowed flag this build does not have
    ],
)
def test_invalid_extra_args(help_text: str, extra: list[str], message: str) -> None:
    with pytest.raises(ArgvError, match=message):
        check_extra_args(extra, accepted_flags(help_text))


def test_valid_extra_args_with_negative_values(help_text: str) -> None:
    check_extra_args(['-n', '-1', '--temp', '0.7', '--cache-reuse', '256'], accepted_flags(help_text))


def test_bad_values_are_rejected_by_the_model() -> None:
    for bad in (
        {'ctx_size': -1},
        {'flash_attn': 'maybe'},
        {'cache_type_k': 'q3'},
        {'nope': 1},
        {'env': {'A=B': 'x'}},
        {'extra_args': ['--tools', 'all']},
    ):
        with pytest.raises(ValueError):
            ModelParams.model_validate(bad)


def test_defaults_overlaid_by_model_overrides() -> None:
    s = Settings(
        defaults={'ctx_size': 1024, 'threads': 2, 'ttl': 30},
        models={'m': {'ctx_size': 2048, 'pinned': True}},
    )
    eff = effective_params(s, 'm')
    assert (eff.ctx_size, eff.threads, eff.ttl, eff.pinned) == (2048, 2, 30, True)
    assert effective_params(s, 'other').ctx_size == 1024


async def test_many_params_start_a_real_server(settings_factory: Callable[..., Any], tiny_model: Path) -> None:
    """The seed generated flags llama-server does not have and crash-looped: start one with most of them."""
    launch = {
        'ctx_size': 512,
        'threads': 1,
        'threads_batch': 1,
        'batch_size': 64,
        'ubatch_size': 32,
        'parallel': 2,
        'n_gpu_layers': 0,
        'flash_attn': 'off',
        'cache_type_k': 'f16',
        'cache_type_v': 'f16',
        'no_mmap': True,
        'rope_freq_base': 10000.0,
        'jinja': True,
        'alias': 'tiny-alias',
        'embeddings': True,
        'pooling': 'mean',
        'extra_args': ['--cache-reuse', '0'],
    }
    h = make_harness(settings_factory(defaults=launch), FakeLibrary({'tiny': tiny_model}))
    await h.scheduler.start()
    try:
        up = await h.scheduler.load('tiny')
        cmdline = psutil.Process(up.pid).cmdline()
        assert cmdline[cmdline.index('--ctx-size') + 1] == '512'
        async with direct(up) as c:
            assert (await c.get('/v1/models')).json()['data'][0]['id'] == 'tiny-alias'
            emb = await c.post('/v1/embeddings', json={'input': 'hello'})
            assert emb.status_code == 200 and emb.json()['data'][0]['embedding']
    finally:
        await h.scheduler.stop()


# ---- REST -----------------------------------------------------------------------------------------------------


@pytest.fixture
async def api(system_factory: Callable[..., Any], models_dir: Path, tiny_model: Path) -> AsyncIterator[Any]:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False)
    app = FastAPI()
    app.include_router(parameters.router)
    app.include_router(models_control.router)
    app.state.system = system
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://test', timeout=60) as c:
        c.system = system  # type: ignore[attr-defined]
        yield c


def _model_id(system: Any, path: Path) -> str:
    return next(e.id for e in system.library.models() if Path(e.path) == path)


async def test_put_get_global_parameters(api: Any) -> None:
    r = await api.put('/api/parameters', json={'ctx_size': 1024, 'threads': 2})
    assert r.status_code == 200, r.text
    assert (await api.get('/api/parameters')).json()['params'] == {'ctx_size': 1024, 'threads': 2}
    # Persisted through the settings manager: in the config file and in the live settings.
    assert api.system.config.settings.defaults.ctx_size == 1024
    assert '"ctx_size": 1024' in api.system.config.config_path.read_text()


async def test_parameter_field_errors_save_nothing(api: Any) -> None:
    await api.put('/api/parameters', json={'ctx_size': 1024})
    for body, field in (
        ({'ctx_size': -5}, 'ctx_size'),
        ({'flash_attn': 'sometimes'}, 'flash_attn'),
        ({'bogus': 1}, 'bogus'),
        ({'extra_args': ['--definitely-not-a-flag']}, 'extra_args'),
    ):
        r = await api.put('/api/parameters', json=body)
        assert r.status_code == 422, body
        assert r.json()['detail'][0]['field'] == field
    assert (await api.get('/api/parameters')).json()['params'] == {'ctx_size': 1024}
    assert api.system.config.settings.defaults.ctx_size == 1024


async def test_model_parameters(api: Any, tiny_model: Path) -> None:
    mid = _model_id(api.system, tiny_model)
    await api.put('/api/parameters', json={'ctx_size': 1024, 'threads': 2})
    r = await api.put(f'/api/models/{mid}/parameters', json={'ctx_size': 512, 'ttl': 60})
    assert r.status_code == 200, r.text
    body = (await api.get(f'/api/models/{mid}/parameters')).json()
    assert body['params'] == {'ctx_size': 512, 'ttl': 60.0}
    assert body['effective']['ctx_size'] == 512 and body['effective']['threads'] == 2
    bad = await api.put(f'/api/models/{mid}/parameters', json={'extra_args': ['--port', '1']})
    assert bad.status_code == 422 and 'supervisor' in bad.json()['detail'][0]['message']
    assert (await api.put(f'/api/models/{mid}/parameters', json={})).status_code == 200
    assert mid not in api.system.config.settings.models
    assert (await api.get('/api/models/nope/parameters')).status_code == 404


async def test_load_unload_endpoints(api: Any, tiny_model: Path) -> None:
    mid = _model_id(api.system, tiny_model)
    r = await api.post(f'/api/models/{mid}/load')
    assert r.status_code == 200, r.text
    assert r.json()['status'] == 'ready' and r.json()['pid']
    pid = r.json()['pid']
    r = await api.post(f'/api/models/{mid}/unload')
    assert r.json()['was_running'] is True and r.json()['status'] == 'stopped'
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    await api.post(f'/api/models/{mid}/load')
    assert (await api.post('/api/models/unload')).json() == {'unloaded': 1}
    assert (await api.post('/api/models/nope/load')).status_code == 404
