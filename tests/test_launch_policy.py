"""Launch parameters are data: what an attacker with the admin API tried (code execution, file reads, env
injection, smuggled flags) is refused by every channel, and a real llama-server never gets it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.launch_policy import check_env, check_extra_args, child_env
from core.supervisor.errors import ParamsRefused
from tests.proxy_helpers import serve
from tests.supervisor_helpers import direct

MODEL = 'tiny-llama'


@pytest.fixture
async def served(system_factory: Any, models_dir: Path, tiny_model: Path) -> Any:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False)
    async with serve(system) as s:
        yield s


REFUSED_EXTRA = [
    (['--tools', 'all'], 'run commands'),
    (['--tools=all'], 'run commands'),
    (['--mcp-servers-json', '{}'], 'run commands'),
    (['--path', '/'], 'serves files'),
    (['--media-path', '/'], 'serves files'),
    (['--chat-template-file', '/etc/passwd'], 'typed field'),
    (['--grammar-file', '/etc/passwd'], 'reads a file'),
    (['--log-file', '/tmp/x'], 'writes files'),
    (['--slot-save-path', '/tmp'], 'writes files'),
    (['-hf', 'someone/model'], 'network'),
    (['--rpc', '10.0.0.1:50052'], 'other machines'),
    (['--model', '/etc/passwd'], 'set by the supervisor'),
    (['--host', '0.0.0.0'], 'set by the supervisor'),
    (['--port', '1'], 'set by the supervisor'),
    (['--api-key', 'x'], 'its own key'),
    (['--ssl-key-file', '/k'], 'TLS'),
    (['--cors-origins', '*'], 'CORS'),
    (['--props'], 'change the server settings'),
    (['--lora', '/etc/passwd'], 'outside the model folders'),
    (['--definitely-not-a-flag'], 'safe to expose'),
    # item 11: one argument smuggled inside another, or a flag that only looks like one
    ([' --model'], 'no spaces or tabs around a flag'),
    (['\t--host'], 'no spaces or tabs around a flag'),
    (['—model', 'x'], 'typographic dash'),
    (['--temp', '4 --rpc x'], 'more than one argument'),
    (['--temp', '0.5\n--tools'], 'more than one argument'),
    (['4'], 'must follow the flag'),
    (['--temp', '0.5', '0.6'], 'must follow the flag'),
    (['--temp=0.5'], 'takes no "="'),  # llama-server would not start: it has no --flag=value
    (['--temp', 'a\x00b'], 'control characters'),
]


@pytest.mark.parametrize(('extra', 'why'), REFUSED_EXTRA)
async def test_dangerous_or_malformed_extra_args_are_field_errors(served: Any, extra: list[str], why: str) -> None:
    async with served.client() as c:
        r = await c.put(f'/api/models/{MODEL}/parameters', json={'extra_args': extra})
        assert r.status_code == 422, r.text
        error = r.json()['detail'][0]
        assert error['field'].startswith('extra_args') and why in error['message'], error
        assert MODEL not in served.system.config.settings.models  # nothing saved


async def test_no_channel_takes_a_refused_flag_and_the_server_never_gets_it(
    served: Any, models_dir: Path, tmp_path: Path
) -> None:
    """The reported exploit: `--tools all`, load, then a shell command through /upstream/{id}/tools."""
    pwned = tmp_path / 'pwned.txt'
    bad = {'extra_args': ['--tools', 'all']}
    async with served.client() as c:
        assert (await c.put('/api/parameters', json=bad)).status_code == 422
        r = await c.put('/api/config', json={'models': {MODEL: bad}})
        assert r.status_code == 422 and 'run commands' in r.json()['detail'][0]['message']
        r = await c.put('/api/config', json={'defaults': {'env': {'LLAMA_ARG_TOOLS': 'all'}}})
        assert r.status_code == 422
        assert not served.system.config.config_path.exists()  # nothing was saved by any of them
        # A config file edited by hand: the value is dropped with a warning, never launched.
        hand_edit = {'models': {MODEL: {**bad, 'ctx_size': 1024}, 'other': {'ctx_size': 512}}}
        served.system.config.config_path.write_text(json.dumps(hand_edit))
        served.system.config.reload()
        models = served.system.config.settings.models
        assert models[MODEL].extra_args is None and models[MODEL].ctx_size == 1024  # that value alone is dropped
        assert models['other'].ctx_size == 512
        assert (await c.put('/api/config', json={'sse_heartbeat': 20})).status_code == 200  # saving still works
        assert '--tools' not in served.system.config.config_path.read_text()
        assert any('run commands' in w.message for w in served.system.config.warnings)
        loaded = await c.post(f'/api/models/{MODEL}/load')
        assert loaded.status_code == 200, loaded.text
        assert '--tools' not in psutil.Process(loaded.json()['pid']).cmdline()
        call = {'tool': 'exec_shell_command', 'params': {'command': f'id > {pwned}'}}
        r = await c.post(f'/upstream/{MODEL}/tools', json=call)
        assert r.status_code >= 400
    assert not pwned.exists()


async def test_file_paths_must_be_inside_the_model_folders(served: Any, models_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / 'template.jinja'
    outside.write_text('{{ messages }}')
    inside = models_dir / 'policy-template.jinja'
    inside.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    (models_dir / 'passwd-link.jinja').unlink(missing_ok=True)
    (models_dir / 'passwd-link.jinja').symlink_to('/etc/passwd')  # a link out counts as outside
    refused = [
        ('mmproj', '/etc/passwd', 'outside the model folders'),
        ('mmproj', '/proc/self/environ', 'outside the model folders'),
        ('mmproj', str(inside), 'not a GGUF file'),  # inside the folder, but no model file
        ('chat_template_file', str(outside), 'outside the model folders'),
        ('chat_template_file', str(models_dir / 'passwd-link.jinja'), 'outside the model folders'),
        # Any file in the folders is still no template: it is the one file llama-server shows back in /props.
        ('chat_template_file', str(models_dir / 'tiny-llama.gguf'), 'ends in .jinja'),
        ('chat_template_file', '/etc/passwd', 'outside the model folders'),
        ('chat_template_file', str(models_dir / 'model-link.jinja'), 'ends in .jinja'),  # by its target
    ]
    (models_dir / 'model-link.jinja').unlink(missing_ok=True)
    (models_dir / 'model-link.jinja').symlink_to(models_dir / 'tiny-llama.gguf')
    async with served.client() as c:
        for field, value, why in refused:
            r = await c.put(f'/api/models/{MODEL}/parameters', json={field: value})
            assert r.status_code == 422, (field, value)
            assert r.json()['detail'][0]['field'] == field and why in r.json()['detail'][0]['message'], r.json()
        r = await c.put(f'/api/models/{MODEL}/parameters', json={'extra_args': ['--lora', str(inside)]})
        assert r.status_code == 422 and 'not a GGUF file' in r.text
        r = await c.put(f'/api/models/{MODEL}/parameters', json={'chat_template_file': str(inside), 'jinja': True})
        assert r.status_code == 200, r.text
        loaded = await c.post(f'/api/models/{MODEL}/load')
        assert loaded.status_code == 200, loaded.text
        props = (await c.get(f'/upstream/{MODEL}/props')).json()
        assert '<assistant>' in props['chat_template']  # the file inside the folder is the one in use
    inside.unlink()
    (models_dir / 'passwd-link.jinja').unlink()
    (models_dir / 'model-link.jinja').unlink()


@pytest.mark.parametrize(
    ('env', 'why'),
    [
        ({'LD_PRELOAD': '/tmp/evil.so'}, 'not allowed'),
        ({'LD_LIBRARY_PATH': '/tmp'}, 'not allowed'),
        ({'PATH': '/tmp'}, 'not allowed'),
        ({'LLAMA_ARG_STATIC_PATH': '/'}, 'not allowed'),
        ({'LLAMA_ARG_TOOLS': 'all'}, 'not allowed'),
        ({'GGML_BACKEND_PATH': '/tmp/evil.so'}, 'not allowed'),
        ({'CUDA_CACHE_PATH': '/tmp'}, 'not allowed'),
        ({'A\nB': 'x'}, 'not a valid variable name'),
        ({'lower': 'x'}, 'not a valid variable name'),
        ({'OMP_NUM_THREADS': '1\nLD_PRELOAD=/x'}, 'one line of text'),
    ],
)
async def test_env_is_an_allowlist_of_tuning_knobs(served: Any, env: dict[str, str], why: str) -> None:
    async with served.client() as c:
        r = await c.put(f'/api/models/{MODEL}/parameters', json={'env': env})
        assert r.status_code == 422, r.text
        assert r.json()['detail'][0]['field'] == 'env' and why in r.json()['detail'][0]['message']


async def test_the_childs_environment_is_built_from_an_allowlist(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Variables in the app's own environment that would set llama-server flags we never chose.
    monkeypatch.setenv('LLAMA_ARG_STATIC_PATH', '/')
    monkeypatch.setenv('LLAMA_ARG_TOOLS', 'all')
    monkeypatch.setenv('LD_PRELOAD', '')
    async with served.client() as c:
        r = await c.put(f'/api/models/{MODEL}/parameters', json={'env': {'OMP_NUM_THREADS': '1'}})
        assert r.status_code == 200, r.text
        loaded = await c.post(f'/api/models/{MODEL}/load')
        assert loaded.status_code == 200, loaded.text
        environ = psutil.Process(loaded.json()['pid']).environ()
        assert not [k for k in environ if k.startswith('LLAMA_ARG_') or k == 'LD_PRELOAD']
        assert environ['OMP_NUM_THREADS'] == '1' and environ['PATH'] == os.environ['PATH']
        assert (await c.get(f'/upstream/{MODEL}/etc/passwd')).status_code != 200
        assert 'root:' not in (await c.get(f'/upstream/{MODEL}/etc/passwd')).text


async def test_each_server_requires_its_own_key_that_no_command_line_shows(
    system_factory: Any, models_dir: Path, tiny_model: Path
) -> None:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, api_keys=['app-key'])
    async with serve(system) as s, s.client(headers={'Authorization': 'Bearer app-key'}) as c:
        assert (await c.post(f'/api/models/{MODEL}/load')).status_code == 200
        up = s.upstream(MODEL)
        assert up.api_key and up.api_key not in ' '.join(psutil.Process(up.pid).cmdline())
        key_file = Path(psutil.Process(up.pid).cmdline()[psutil.Process(up.pid).cmdline().index('--api-key-file') + 1])
        assert key_file.stat().st_mode & 0o077 == 0 and key_file.parent.stat().st_mode & 0o077 == 0
        body = {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 2}
        async with direct(up) as own, direct(up) as stranger:
            stranger.headers.pop('Authorization')
            for method, path in (('GET', '/props'), ('GET', '/slots'), ('POST', '/v1/chat/completions')):
                r = await stranger.request(method, path, json=body if method == 'POST' else None)
                assert r.status_code == 401, path  # its port is no way around the app's key
                r = await stranger.request(
                    method, path, json=body if method == 'POST' else None, headers={'Authorization': 'Bearer app-key'}
                )
                assert r.status_code == 401, path  # nor is the app's own key a key to it
            preflight = await stranger.options(
                '/props', headers={'Origin': 'http://evil.example', 'Access-Control-Request-Method': 'GET'}
            )
            assert preflight.headers.get('access-control-allow-origin') in (None, 'none')
            assert (await own.get('/slots')).status_code == 200
        assert (await c.post('/v1/chat/completions', json={**body, 'model': MODEL})).status_code == 200
        assert (await c.get(f'/upstream/{MODEL}/slots')).status_code == 200
        sample = await system.metrics.sample_once()  # the sampler scrapes with the key
        llama = sample['models'][MODEL]['llama']
        assert 'errors' not in llama and llama.get('slots_total'), llama
        assert up.api_key not in json.dumps(sample, default=str)  # and the key is in no sample


def test_policy_unit_cases(tmp_path: Path) -> None:
    check_extra_args(
        ['--temp', '0.7', '-n', '-1', '--seed', '-1', '--spec-draft-n-max', '8', '--override-kv', 'a=int:1']
    )
    check_extra_args(['-r', 'User: ', '--grammar', 'root ::= "a"\nb ::= "c"', '--spec-replace', 'A', 'B'])
    for name in ('a.gguf', 'b.gguf'):
        (tmp_path / name).write_bytes(b'GGUF' + bytes(16))
    a, b = tmp_path / 'a.gguf', tmp_path / 'b.gguf'
    check_extra_args(['--lora', str(a)], [tmp_path])
    check_extra_args(['--lora', f'{a},{b}', '--lora-scaled', f'{a}:0.5,{b}:1'], [tmp_path])
    with pytest.raises(ParamsRefused, match='outside'):
        check_extra_args(['--lora', f'{a},/etc/passwd'], [tmp_path])  # every one of a list
    with pytest.raises(ParamsRefused, match='outside'):
        check_extra_args(['--lora', '/etc/passwd'], [tmp_path])
    with pytest.raises(ParamsRefused, match='needs a file path'):
        check_extra_args(['--lora'], [tmp_path])
    check_env({'CUDA_VISIBLE_DEVICES': '0,1', 'GGML_CUDA_FORCE_MMQ': '1', 'OMP_NUM_THREADS': '4'})
    for name in ('OMP_TOOL_VERBOSE_INIT', 'CUDA_ENABLE_COREDUMP_ON_EXCEPTION', 'GGML_BACKEND_PATH', 'HF_TOKEN'):
        with pytest.raises(ParamsRefused, match='not allowed'):
            check_env({name: 'x'})
    env = child_env({'PATH': '/bin', 'LLAMA_ARG_PORT': '1', 'LD_PRELOAD': 'x', 'GGML_BACKEND_PATH': 'x', 'LC_ALL': 'C'})
    assert env == {'PATH': '/bin', 'LC_ALL': 'C'}


async def test_a_value_after_a_switch_is_refused_before_it_could_crash_loop(served: Any) -> None:
    async with served.client() as c:
        r = await c.put(f'/api/models/{MODEL}/parameters', json={'extra_args': ['--jinja', '/etc/passwd']})
        assert r.status_code == 422 and 'takes no value' in r.json()['detail'][0]['message']
        ok = await c.put(f'/api/models/{MODEL}/parameters', json={'extra_args': ['--jinja', '--temp', '0.2', '-cb']})
        assert ok.status_code == 200, ok.text
        assert (await c.post(f'/api/models/{MODEL}/load')).status_code == 200
