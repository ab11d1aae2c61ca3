"""ModelParams -> llama-server argv, checked against the flags the binary at hand prints in `--help`.

Flags differ across llama.cpp builds (e.g. `--mlock`/`--no-mmap` became `--load-mode`), so each field lists the
spellings it may take and the first one the binary accepts wins. A field whose flags the binary lacks is an error
before spawn, never a crash loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from core import launch_policy as policy
from core.model_params import ModelParams
from core.supervisor.errors import ArgvError

# Typed fields that hold a file path, resolved and refused unless inside the model folders: what the file must be.
TEMPLATE_SUFFIXES = ('.jinja', '.jinja2', '.j2')

# field -> candidate flags (first accepted wins). Booleans are switches; None values are never passed.
VALUE_FLAGS: dict[str, tuple[str, ...]] = {
    'ctx_size': ('--ctx-size', '-c'),
    'threads': ('--threads', '-t'),
    'threads_batch': ('--threads-batch', '-tb'),
    'batch_size': ('--batch-size', '-b'),
    'ubatch_size': ('--ubatch-size', '-ub'),
    'parallel': ('--parallel', '-np'),
    'n_gpu_layers': ('--n-gpu-layers', '--gpu-layers', '-ngl'),
    'main_gpu': ('--main-gpu', '-mg'),
    'split_mode': ('--split-mode', '-sm'),
    'tensor_split': ('--tensor-split', '-ts'),
    'flash_attn': ('--flash-attn', '-fa'),
    'rpc': ('--rpc',),
    'cache_type_k': ('--cache-type-k', '-ctk'),
    'cache_type_v': ('--cache-type-v', '-ctv'),
    'rope_scaling': ('--rope-scaling',),
    'rope_scale': ('--rope-scale',),
    'rope_freq_base': ('--rope-freq-base',),
    'rope_freq_scale': ('--rope-freq-scale',),
    'yarn_orig_ctx': ('--yarn-orig-ctx',),
    'pooling': ('--pooling',),
    'chat_template': ('--chat-template',),
    'chat_template_file': ('--chat-template-file',),
    'alias': ('--alias', '-a'),
}
# field -> (flag when True, flag when False); either may be None when the binary has no such switch.
SWITCH_FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    'embeddings': (('--embeddings', '--embedding'), ()),
    'jinja': (('--jinja',), ('--no-jinja',)),
}
# Fields that never become flags.
NOT_FLAGS = frozenset(
    {'extra_args', 'env', 'ttl', 'pinned', 'preload', 'aliases', 'request', 'mmproj', 'mlock', 'no_mmap'}
)

_FLAG_TOKEN = re.compile(r'^--?[A-Za-z][\w-]*$')


def _option_columns(help_text: str) -> Iterator[list[str]]:
    """The option column of each `llama-server --help` line, split: `['-c', '--ctx-size', 'N']`."""
    for line in help_text.splitlines():
        if line.startswith('-'):
            # `-c,    --ctx-size N      size of ...`: join the spellings, then cut at the description column.
            spec = re.split(r'\s{2,}', re.sub(r',\s+', ', ', line.strip()), maxsplit=1)[0]
            yield [p for p in re.split(r'[,\s]+', spec) if p]


@lru_cache(maxsize=8)
def accepted_flags(help_text: str) -> frozenset[str]:
    """Every `-x` / `--xyz` spelling in the option column of `llama-server --help`."""
    return frozenset(p for parts in _option_columns(help_text) for p in parts if _FLAG_TOKEN.match(p))


@lru_cache(maxsize=8)
def switch_flags(help_text: str) -> frozenset[str]:
    """The spellings of options that take no value (no placeholder such as `N` or `FNAME` after them)."""
    return frozenset(
        p for parts in _option_columns(help_text) if parts and all(_FLAG_TOKEN.match(x) for x in parts) for p in parts
    )


def _pick(candidates: tuple[str, ...], flags: frozenset[str]) -> str | None:
    return next((c for c in candidates if c in flags), None)


def _value(field: str, value: Any) -> str:
    if field == 'n_gpu_layers' and value == -1:
        return 'all'
    if isinstance(value, list):
        return ','.join(v if isinstance(v, str) else _num(v) for v in value)
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _load_mode_args(params: ModelParams, flags: frozenset[str]) -> list[str]:
    """mlock / no_mmap: separate switches in older builds, one `--load-mode` in newer ones."""
    if not params.mlock and not params.no_mmap:
        return []
    if '--load-mode' in flags and not ({'--mlock', '--no-mmap'} & flags):
        if params.mlock:
            return ['--load-mode', 'mlock' if params.no_mmap else 'mmap+mlock']
        return ['--load-mode', 'none']
    out = []
    for field, flag in (('mlock', '--mlock'), ('no_mmap', '--no-mmap')):
        if getattr(params, field):
            if flag not in flags:
                raise ArgvError(field, f'this llama-server has no {flag} (nor --load-mode)')
            out.append(flag)
    return out


def params_args(params: ModelParams, flags: frozenset[str]) -> list[str]:
    """The flags for every set launch field, in a stable order."""
    out: list[str] = []
    for field, candidates in VALUE_FLAGS.items():
        value = getattr(params, field)
        if value is None:
            continue
        flag = _pick(candidates, flags)
        if flag is None:
            raise ArgvError(field, f'this llama-server accepts none of {", ".join(candidates)}')
        out += [flag, _value(field, value)]
    for field, (on, off) in SWITCH_FLAGS.items():
        value = getattr(params, field)
        if value is None:
            continue
        wanted = on if value else off
        if not wanted:  # e.g. embeddings=False: simply not passed
            continue
        flag = _pick(wanted, flags)
        if flag is None:
            raise ArgvError(field, f'{value}: this llama-server accepts none of {", ".join(wanted)}')
        out.append(flag)
    out += _load_mode_args(params, flags)
    return out


def check_extra_args(
    extra: list[str],
    flags: frozenset[str],
    roots: Iterable[Path] | None = None,
    switches: frozenset[str] = frozenset(),
) -> None:
    """Every item must pass the launch policy (`core/launch_policy.py`), every flag be one the binary knows, and no
    value follow a switch (`--jinja x` would stop llama-server at start, then again at every restart)."""
    policy.check_extra_args(extra, roots)
    after_switch: str | None = None
    for i, token in enumerate(extra):
        is_flag = bool(_FLAG_TOKEN.match(token)) and not policy.is_number(token)
        if is_flag and token not in flags:
            raise ArgvError('extra_args', f'llama-server does not accept {token} (see llama-server --help)')
        if not is_flag and after_switch is not None:
            raise ArgvError(f'extra_args[{i}]', f'{after_switch} takes no value, so {token!r} would be one too many')
        after_switch = token if is_flag and token in switches else None


def check_files(params: ModelParams, roots: Iterable[Path] | None) -> ModelParams:
    """`params` with each file path resolved; every one must be a file inside the model folders."""
    if roots is None:
        return params
    roots = list(roots)
    update: dict[str, Path] = {}
    if params.mmproj is not None:
        update['mmproj'] = policy.check_path('mmproj', params.mmproj, roots, policy.GGUF_MAGIC)
    if params.chat_template_file is not None:
        # Not any file in the folders: a template is the one kind whose text llama-server hands back (/props).
        real = policy.check_path('chat_template_file', params.chat_template_file, roots)
        if params.chat_template_file.suffix.lower() not in TEMPLATE_SUFFIXES or real.suffix.lower() not in (
            TEMPLATE_SUFFIXES
        ):  # a link's target too: `tpl.jinja -> model.gguf` would echo the model's bytes
            raise ArgvError('chat_template_file', f'a chat template file ends in {", ".join(TEMPLATE_SUFFIXES)}')
        update['chat_template_file'] = real
    return params.model_copy(update=update) if update else params


@dataclass(frozen=True)
class LaunchSpec:
    """What to run for one model; the port is filled in per spawn."""

    binary: Path
    model_path: Path
    mmproj: Path | None
    params: ModelParams

    def argv(
        self, port: int, help_text: str, roots: Iterable[Path] | None = None, key_file: Path | None = None
    ) -> list[str]:
        flags = accepted_flags(help_text)
        argv = [str(self.binary), '--model', str(self.model_path), '--host', '127.0.0.1', '--port', str(port)]
        argv.append('--metrics')
        if key_file is not None:
            argv += ['--api-key-file', str(key_file)]
        if '--cors-origins' in flags:  # its default is `*`; "none" matches no origin, so browsers read nothing
            argv += ['--cors-origins', 'none']
        if self.mmproj is not None:
            argv += ['--mmproj', str(self.mmproj)]
        argv += params_args(self.params, flags)
        extra = list(self.params.extra_args or [])
        check_extra_args(extra, flags, roots, switch_flags(help_text))
        return argv + extra


def validate_params(params: ModelParams, help_text: str, roots: Iterable[Path] | None = None) -> ModelParams:
    """Raise ArgvError if this binary cannot be started with `params` (used before saving and before spawn), or
    if a file path, flag or environment variable is refused by the launch policy (paths checked when `roots` is
    given). Returns `params` with file paths resolved."""
    params = check_policy(params, roots)
    flags = accepted_flags(help_text)
    params_args(params, flags)
    check_extra_args(list(params.extra_args or []), flags, roots, switch_flags(help_text))
    return params


def check_policy(params: ModelParams, roots: Iterable[Path] | None) -> ModelParams:
    """The launch policy alone (no binary needed): file paths, extra_args items, env names."""
    params = check_files(params, roots)
    policy.check_extra_args(params.extra_args or [], roots)
    policy.check_env(params.env)
    return params
