"""ModelParams -> llama-server argv, checked against the flags the binary at hand prints in `--help`.

Flags differ across llama.cpp builds (e.g. `--mlock`/`--no-mmap` became `--load-mode`), so each field lists the
spellings it may take and the first one the binary accepts wins. A field whose flags the binary lacks is an error
before spawn, never a crash loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.model_params import ModelParams

# Flags the supervisor sets itself; extra_args must not fight over them.
MANAGED_FLAGS = frozenset({'-m', '--model', '--host', '--port', '--metrics', '-mm', '--mmproj'})

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
NOT_FLAGS = frozenset({'extra_args', 'env', 'ttl', 'pinned', 'request', 'mmproj', 'mlock', 'no_mmap'})

_FLAG_TOKEN = re.compile(r'^--?[A-Za-z][\w-]*$')


class ArgvError(ValueError):
    """A parameter this binary cannot take; `field` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f'{field}: {message}')
        self.field = field
        self.message = message


@lru_cache(maxsize=8)
def accepted_flags(help_text: str) -> frozenset[str]:
    """Every `-x` / `--xyz` spelling in the option column of `llama-server --help`."""
    flags: set[str] = set()
    for line in help_text.splitlines():
        if not line.startswith('-'):
            continue
        # `-c,    --ctx-size N      size of ...`: join the spellings, then cut at the description column.
        spec = re.split(r'\s{2,}', re.sub(r',\s+', ', ', line.strip()), maxsplit=1)[0]
        for part in re.split(r'[,\s]+', spec):
            if _FLAG_TOKEN.match(part):
                flags.add(part)
    return frozenset(flags)


def _pick(candidates: tuple[str, ...], flags: frozenset[str]) -> str | None:
    return next((c for c in candidates if c in flags), None)


def _value(field: str, value: Any) -> str:
    if field == 'n_gpu_layers' and value == -1:
        return 'all'
    if isinstance(value, list):
        return ','.join(_num(v) for v in value)
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


def check_extra_args(extra: list[str], flags: frozenset[str]) -> None:
    """Every flag in `extra` must be one the binary knows, and none may replace what the supervisor sets."""
    for token in extra:
        name = token.split('=', 1)[0]
        if not _FLAG_TOKEN.match(name):
            continue  # a value such as `4`, `-1` or `q8_0`
        if name in MANAGED_FLAGS:
            raise ArgvError('extra_args', f'{name} is set by the supervisor and cannot be overridden')
        if name not in flags:
            raise ArgvError('extra_args', f'llama-server does not accept {name} (see llama-server --help)')


@dataclass(frozen=True)
class LaunchSpec:
    """What to run for one model; the port is filled in per spawn."""

    binary: Path
    model_path: Path
    mmproj: Path | None
    params: ModelParams

    def argv(self, port: int, help_text: str) -> list[str]:
        flags = accepted_flags(help_text)
        argv = [str(self.binary), '--model', str(self.model_path), '--host', '127.0.0.1', '--port', str(port)]
        argv.append('--metrics')
        if self.mmproj is not None:
            argv += ['--mmproj', str(self.mmproj)]
        argv += params_args(self.params, flags)
        extra = list(self.params.extra_args or [])
        check_extra_args(extra, flags)
        return argv + extra


def validate_params(params: ModelParams, help_text: str) -> None:
    """Raise ArgvError if this binary cannot be started with `params` (used before saving and before spawn)."""
    flags = accepted_flags(help_text)
    params_args(params, flags)
    check_extra_args(list(params.extra_args or []), flags)
