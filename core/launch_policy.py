"""What a user may hand to llama-server: launch parameters are data, never a way to run code or read files.

llama-server has flags that execute commands (`--tools`), serve or read any file (`--path`, `--media-path`,
`--chat-template-file`, `--grammar-file`, log files), fetch from the network (`-hf`, `--model-url`, `--rpc`),
or take over what the supervisor sets (`--model`, `--host`, `--port`, `--api-key*`, `--ssl-*`). So `extra_args`
takes only flags from `SAFE_FLAGS` (sampling, performance, cache and context), each item one well-formed flag or
value; file paths (typed fields and the path flags below) must resolve inside the configured model folders, and
name a GGUF file (a template file: a .jinja one).
The child's environment is built from an allowlist as well: `LLAMA_ARG_*` sets any flag, `LD_PRELOAD` loads
code, `GGML_BACKEND_PATH` loads a backend library.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path


class ArgvError(ValueError):
    """A launch parameter that cannot be used; `field` names it, the message says why (422)."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f'{field}: {message}')
        self.field = field
        self.message = message


class ParamsRefused(ArgvError):
    """Refused by this policy: it would run code, read files or take over what the supervisor sets."""


# Spellings across llama.cpp builds; the binary's own --help still decides which of them exist.
SAFE_FLAGS = frozenset(
    {
        # sampling
        *('--samplers', '--sampling-seq', '--sampler-seq', '--ignore-eos', '--temp', '--temperature'),
        *('--top-k', '--top-p', '--min-p', '--top-nsigma', '--xtc-probability', '--xtc-threshold', '--typical'),
        *('--typical-p', '--repeat-last-n', '--repeat-penalty', '--presence-penalty', '--frequency-penalty'),
        *('--dry-multiplier', '--dry-base', '--dry-allowed-length', '--dry-penalty-last-n'),
        *('--dry-sequence-breaker', '--dynatemp-range', '--dynatemp-exp', '--mirostat', '--mirostat-lr'),
        *('--mirostat-ent', '-l', '--logit-bias', '--grammar', '-j', '--json-schema', '-s', '--seed'),
        *('-n', '--n-predict', '--predict', '--keep', '--backend-sampling'),
        # context, cache, batching
        *('-c', '--ctx-size', '-b', '--batch-size', '-ub', '--ubatch-size', '-np', '--parallel'),
        *('--swa-full', '--no-context-shift', '--context-shift', '--cache-reuse', '--slot-prompt-similarity', '-sps'),
        *('-ctk', '--cache-type-k', '-ctv', '--cache-type-v', '-kvu', '--kv-unified', '--no-kv-unified'),
        *('-nkvo', '--no-kv-offload', '--kv-offload', '-cb', '--cont-batching', '-nocb', '--no-cont-batching'),
        *('-dt', '--defrag-thold', '-cram', '--cache-ram', '--ctx-checkpoints', '--swa-checkpoints'),
        *('--cache-idle-slots', '--no-cache-idle-slots', '-ctxcp', '--no-cache-prompt', '--cache-prompt'),
        *('--grp-attn-n', '-gan', '--grp-attn-w', '-gaw', '--n-draft', '--draft-max', '--draft', '--draft-min'),
        *('--draft-n-min', '--draft-p-min', '--spec-replace'),
        # RoPE / YaRN
        *('--rope-scaling', '--rope-scale', '--rope-freq-base', '--rope-freq-scale', '--yarn-orig-ctx'),
        *('--yarn-ext-factor', '--yarn-attn-factor', '--yarn-beta-slow', '--yarn-beta-fast'),
        # performance, devices, memory
        *('-t', '--threads', '-tb', '--threads-batch', '-C', '--cpu-mask', '-Cr', '--cpu-range', '--cpu-strict'),
        *('--prio', '--poll', '-Cb', '--cpu-mask-batch', '-Crb', '--cpu-range-batch', '--cpu-strict-batch'),
        *('--prio-batch', '--poll-batch', '--numa', '-ngl', '--gpu-layers', '--n-gpu-layers', '-sm'),
        *('--split-mode', '-ts', '--tensor-split', '-mg', '--main-gpu', '-dev', '--device', '-fa', '--flash-attn'),
        *('-ot', '--override-tensor', '-cmoe', '--cpu-moe', '-ncmoe', '--n-cpu-moe', '--no-op-offload'),
        *('--op-offload', '--mlock', '--no-mmap', '--mmap', '--load-mode', '--direct-io', '-dio', '--no-direct-io'),
        *('--check-tensors', '--override-kv', '--no-warmup', '--warmup', '--no-host', '--repack', '--no-repack'),
        *('-fit', '--fit', '-fitt', '--fit-target', '-fitc', '--fit-ctx', '--no-perf', '--perf'),
        *('-ngld', '--gpu-layers-draft', '--n-gpu-layers-draft', '-devd', '--device-draft', '-ctkd'),
        *('--cache-type-k-draft', '-ctvd', '--cache-type-v-draft', '-td', '--threads-draft', '-tbd'),
        *('--threads-batch-draft', '-cd', '--ctx-size-draft', '-otd', '--override-tensor-draft'),
        *('-cmoed', '--cpu-moe-draft', '-ncmoed', '--n-cpu-moe-draft'),
        # serving behaviour that reads or runs nothing
        *('--embedding', '--embeddings', '--rerank', '--reranking', '--pooling', '--attention', '--jinja'),
        *('--no-jinja', '--chat-template', '--reasoning-format', '--reasoning-budget', '--reasoning'),
        *('-rea', '--chat-template-kwargs', '--no-prefill-assistant', '--prefill-assistant', '--spm-infill'),
        *('-to', '--timeout', '--threads-http', '--slots', '--no-slots', '--no-webui', '--webui'),
        *('-a', '--alias', '--tags', '--special', '-sp', '--cont-batching'),
        *('--image-min-tokens', '--image-max-tokens', '--no-mmproj-offload', '--mmproj-offload'),
        # logging to stderr (log files are refused)
        *('-v', '--verbose', '--log-verbose', '-lv', '--verbosity', '--log-verbosity', '--log-disable'),
        *('--log-colors', '--log-prefix', '--log-timestamps', '--offline', '--verbose-prompt'),
        # adapters and draft models: their value is a file that must lie inside the model folders
        *('--lora', '--lora-scaled', '--control-vector', '--control-vector-scaled', '--control-vector-layer-range'),
        *('-md', '--model-draft', '--spec-draft-model', '--lora-init-without-apply', '--mmproj-auto'),
        '--no-mmproj-auto',
        # newer builds
        *('--adaptive-decay', '--adaptive-target', '-cms', '--checkpoint-min-step', '--draft-n', '--draft-p-split'),
        *('--embd-normalize', '-e', '--escape', '--no-escape', '--kv-unified-per-slot', '-no-kvu', '-kvo'),
        *('-mmdev', '--mmproj-device', '--mtmd-batch-max-tokens', '-ncffn', '--n-cpu-ffn', '--no-log-prefix'),
        *('--no-log-timestamps', '--no-mmproj', '--reasoning-preserve', '--no-reasoning-preserve'),
        *('--reasoning-budget-message', '--reasoning-effort', '--skip-chat-parsing', '--no-skip-chat-parsing'),
        *('--sse-ping-interval', '--top-n-sigma', '-r', '--reverse-prompt', '-bs', '--video-fps', '-lm'),
        *('--video-timestamp-interval', '-lzm', '--lazy-mode', '-Cd', '--cpu-mask-draft', '-Crd', '--cpu-range-draft'),
        *('-Cbd', '--cpu-mask-batch-draft', '--cpu-strict-draft', '--cpu-strict-batch-draft', '--prio-draft'),
        *('--prio-batch-draft', '--poll-draft', '--poll-batch-draft', '--ui', '--no-ui', '--ui-config'),
        '--webui-config',
        # speculative decoding tuning: numbers and names (the draft model is a path flag, its -hf form refused)
        *('--spec-default', '--spec-draft-backend-sampling', '--no-spec-draft-backend-sampling'),
        *('--spec-draft-cpu-mask', '--spec-draft-cpu-mask-batch', '--spec-draft-cpu-moe', '--spec-draft-cpu-range'),
        *('--spec-draft-cpu-strict', '--spec-draft-cpu-strict-batch', '--spec-draft-device', '--spec-draft-n-cpu-moe'),
        *('--spec-draft-n-max', '--spec-draft-n-min', '--spec-draft-ncmoe', '--spec-draft-ngl', '--spec-draft-p-min'),
        *('--spec-draft-override-tensor', '--spec-draft-p-split', '--spec-draft-poll', '--spec-draft-poll-batch'),
        *('--spec-draft-prio', '--spec-draft-prio-batch', '--spec-draft-sampling', '--spec-draft-threads'),
        *('--spec-draft-threads-batch', '--spec-draft-type-k', '--spec-draft-type-v', '--spec-ngram-map-k-min-hits'),
        *('--spec-ngram-map-k-size-m', '--spec-ngram-map-k-size-n', '--spec-ngram-map-k4v-min-hits'),
        *('--spec-ngram-map-k4v-size-m', '--spec-ngram-map-k4v-size-n', '--spec-ngram-min-hits'),
        *('--spec-ngram-mod-n-match', '--spec-ngram-mod-n-max', '--spec-ngram-mod-n-min'),
        *('--spec-ngram-simple-min-hits', '--spec-ngram-simple-size-m', '--spec-ngram-simple-size-n'),
        *('--spec-ngram-size-m', '--spec-ngram-size-n', '--spec-synth-len', '--spec-synth-rates', '--spec-type'),
    }
)
# Flags whose next value (or `=value`) is a file path.
PATH_FLAGS = frozenset(
    {'--lora', '--lora-scaled', '--control-vector', '--control-vector-scaled', '-md', '--model-draft'}
    | {'--spec-draft-model'}
)
# Why a known-dangerous flag is refused, for the field error (everything else outside SAFE_FLAGS: "not allowed").
REFUSED_WHY = {
    **dict.fromkeys(('-m', '--model', '--host', '--port', '--metrics', '-mm', '--mmproj'), 'set by the supervisor'),
    **dict.fromkeys(('--api-key', '--api-key-file'), 'the supervisor gives each server its own key'),
    **dict.fromkeys(
        ('--tools', '--tools-runtime', '--mcp-servers-config', '--mcp-servers-json', '-ag', '--agent', '--no-agent'),
        'it lets requests run commands',
    ),
    **dict.fromkeys(('-no-ag', '--ui-mcp-proxy', '--webui-mcp-proxy'), 'it lets requests run commands'),
    **dict.fromkeys(('--no-ui-mcp-proxy', '--no-webui-mcp-proxy'), 'it lets requests run commands'),
    **dict.fromkeys(('--video-ffmpeg-dir',), 'it runs a program from a folder'),
    **dict.fromkeys(('--path', '--media-path', '--ui-config-file', '--webui-config-file'), 'it serves files'),
    **dict.fromkeys(
        ('--cors-origins', '--cors-methods', '--cors-headers', '--cors-credentials', '--no-cors-credentials'),
        "CORS is the app's (the cors_origins setting); its servers allow none",
    ),
    **dict.fromkeys(('--log-jsonl', '--no-log-jsonl'), 'the supervisor reads the log as text'),
    **dict.fromkeys(
        ('-h', '--help', '--usage', '--version', '--completion-bash', '-cl', '--cache-list', '--list-devices'),
        'it prints and exits',
    ),
    **dict.fromkeys(('--ssl-key-file', '--ssl-cert-file'), 'TLS is set on the app, not on its servers'),
    **dict.fromkeys(('--log-file', '--slot-save-path', '-lcs', '--lookup-cache-static', '-lcd'), 'it writes files'),
    **dict.fromkeys(('--lookup-cache-dynamic', '--log-prompts-dir'), 'it writes files'),
    **dict.fromkeys(
        ('--chat-template-file', '--grammar-file', '-jf', '--json-schema-file', '-mu', '--model-url'),
        'it reads a file or URL (use the typed field, which checks the path)',
    ),
    **dict.fromkeys(
        ('-hf', '-hfr', '--hf-repo', '-hff', '--hf-file', '-hft', '--hf-token', '-hfd', '--hf-repo-draft', '-hfrd'),
        'it downloads from the network',
    ),
    **dict.fromkeys(
        ('--spec-draft-hf', '-dr', '--docker-repo', '-mmu', '--mmproj-url'), 'it downloads from the network'
    ),
    **dict.fromkeys(
        ('--models-autoload', '--no-models-autoload', '--models-max', '--sleep-idle-seconds'),
        'set by the supervisor',
    ),
    **dict.fromkeys(('--rpc',), 'it sends the model to other machines'),
    **dict.fromkeys(('--props',), 'it lets requests change the server settings'),
    **dict.fromkeys(('--api-prefix', '--reuse-port', '--models-dir', '--models-preset'), 'set by the supervisor'),
}

_FLAG = re.compile(r'^--?[A-Za-z][A-Za-z0-9-]*$')
_NUMBER = re.compile(r'^-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$')
_NON_ASCII_DASH = re.compile(r'^\s*[\u2010-\u2015\u2212\ufe58\ufe63\uff0d]')
_FLAG_INSIDE = re.compile(r'\s-{1,2}[A-Za-z]')
_CONTROL = re.compile(r'[\x00-\x08\x0b-\x1f\x7f]')  # a value may hold tabs and newlines (a grammar does)
_ENV_CONTROL = re.compile(r'[\x00-\x1f\x7f]')
MAX_ITEM = 4096
# Flags followed by two values; every other flag takes at most one.
TWO_VALUES = frozenset({'--spec-replace', '--control-vector-layer-range'})
# The model files a path flag names are GGUF (`--lora-scaled F:S,...` and `--lora A,B` name several).
GGUF_MAGIC = b'GGUF'


def check_extra_args(extra: Iterable[str], roots: Iterable[Path] | None = None) -> None:
    """Raise ParamsRefused unless every item is an allowed flag or a plain value (paths inside `roots`).

    llama-server reads values by position (`--temp 0.5`; it has no `--temp=0.5`), so a value can never turn into a
    flag; what is checked is that each flag is allowed, and that no item smuggles in several arguments."""
    path_flag: str | None = None
    values_left = 0  # how many more values the last flag may take
    for i, item in enumerate(extra):
        where = f'extra_args[{i}]'
        if not isinstance(item, str) or not item or len(item) > MAX_ITEM:
            raise ParamsRefused(where, f'{item!r}: each item is one flag or one value, 1 to {MAX_ITEM} characters')
        if _CONTROL.search(item):
            raise ParamsRefused(where, f'{item!r}: no control characters')
        if _NON_ASCII_DASH.match(item):
            raise ParamsRefused(where, f'{item!r} starts with a typographic dash: flags start with "-" or "--"')
        if item.strip().startswith('-') and not _NUMBER.match(item.strip()):
            if item != item.strip():
                raise ParamsRefused(where, f'{item!r}: no spaces or tabs around a flag')
            name = item.partition('=')[0]
            if not _FLAG.match(name):
                raise ParamsRefused(where, f'{item!r} is not a well-formed flag')
            if name in REFUSED_WHY or name not in SAFE_FLAGS:
                why = REFUSED_WHY.get(name, 'it is not among the flags that are safe to expose')
                raise ParamsRefused(where, f'{name} is not allowed here: {why}')
            if name != item:
                raise ParamsRefused(where, f'{item!r}: llama-server takes no "=": give the value its own item')
            if path_flag is not None:
                raise ParamsRefused(where, f'{path_flag} needs a file path before {name}')
            path_flag = name if name in PATH_FLAGS else None
            values_left = 2 if name in TWO_VALUES else 1
            continue
        if not values_left:
            raise ParamsRefused(where, f'{item!r}: a value must follow the flag it belongs to')
        if _FLAG_INSIDE.search(item):
            raise ParamsRefused(where, f'{item!r} holds more than one argument: give each its own item')
        if path_flag is not None:
            for part in item.split(','):
                check_path(where, Path(part.rsplit(':', 1)[0] if 'scaled' in path_flag else part), roots, GGUF_MAGIC)
            path_flag = None
        values_left -= 1
    if path_flag is not None:
        raise ParamsRefused('extra_args', f'{path_flag} needs a file path after it')


def is_number(item: str) -> bool:
    """`-1`, `0.5`, `-1e3`: values, though some start with a dash."""
    return bool(_NUMBER.match(item.strip()))


def check_path(field: str, path: Path, roots: Iterable[Path] | None, magic: bytes | None = None) -> Path:
    """The real path of `path`: an existing regular file inside one of `roots` (starting with `magic`, when
    given). Not `~`-expanded: llama-server would not expand it either."""
    if roots is None:
        return path
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise ParamsRefused(field, f'{path}: {e}') from None
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not any(real == r or real.is_relative_to(r) for r in real_roots):
        raise ParamsRefused(field, f'{path} is outside the model folders (models_dirs); put the file there')
    try:
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ParamsRefused(field, f'{path} is not a regular file')
        if magic is not None:
            with real.open('rb') as f:
                if f.read(len(magic)) != magic:
                    raise ParamsRefused(field, f'{path} is not a GGUF file')
    except OSError as e:
        raise ParamsRefused(field, f'{path}: {e.strerror or e}') from None
    return real


# --- the child's environment ---
# From the app's own environment: what a process needs to run and to find its GPU libraries and devices.
INHERITED_ENV = frozenset(
    {
        *('PATH', 'HOME', 'USER', 'LOGNAME', 'LANG', 'LANGUAGE', 'TZ', 'TMPDIR', 'TEMP', 'TMP', 'SYSTEMROOT'),
        *('LD_LIBRARY_PATH', 'DYLD_LIBRARY_PATH', 'CUDA_PATH', 'CUDA_HOME', 'ROCM_PATH', 'HIP_PATH'),
        *('VULKAN_SDK', 'VK_ICD_FILENAMES', 'VK_DRIVER_FILES', 'XDG_RUNTIME_DIR', 'OPENBLAS_CORETYPE'),
        'OPENBLAS_L2_SIZE',
    }
)
INHERITED_PREFIXES = ('LC_', 'CUDA_', 'HIP_', 'ROCR_', 'HSA_', 'GGML_', 'OMP_', 'GPU_', 'NVIDIA_', 'MKL_')
# Settable per model through `env`: device selection and thread knobs by name (an OpenMP or CUDA prefix would let
# in e.g. OMP_TOOL_VERBOSE_INIT=<file>, which writes a file), and ggml's own GGML_* tuning without paths.
PARAM_ENV = frozenset(
    {
        *('CUDA_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES', 'ROCR_VISIBLE_DEVICES', 'GPU_DEVICE_ORDINAL'),
        *('CUDA_DEVICE_ORDER', 'CUDA_LAUNCH_BLOCKING', 'CUDA_MODULE_LOADING', 'ZES_ENABLE_SYSMAN'),
        *('OMP_NUM_THREADS', 'OMP_PROC_BIND', 'OMP_PLACES', 'OMP_WAIT_POLICY', 'OMP_DYNAMIC', 'OMP_STACKSIZE'),
        *('OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'GOTO_NUM_THREADS', 'BLIS_NUM_THREADS'),
    }
)
PARAM_ENV_PREFIXES = ('GGML_',)
_ENV_NAME = re.compile(r'^[A-Z][A-Z0-9_]{0,127}$')
_NO_ENV_PARTS = ('PATH', 'DIR', 'FILE', 'LIB', 'PRELOAD', 'ROOT', 'HOME', 'CACHE', 'CONFIG', 'PLUGIN', 'SOCKET')


def _safe_knob(name: str) -> bool:
    return not any(part in name for part in _NO_ENV_PARTS)


def check_env(env: Mapping[str, str] | None) -> None:
    """Raise ParamsRefused for an `env` name that is not a tuning knob, or a value with control characters."""
    for name, value in (env or {}).items():
        field = f'env.{name}'
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ParamsRefused('env', f'{name!r} is not a valid variable name (A-Z, 0-9, _)')
        if not (name in PARAM_ENV or (name.startswith(PARAM_ENV_PREFIXES) and _safe_knob(name))):
            raise ParamsRefused(
                field,
                f'{name} is not allowed: only device selection and thread counts ({", ".join(sorted(PARAM_ENV))}) '
                'and GGML_* tuning variables without paths',
            )
        if not isinstance(value, str) or len(value) > MAX_ITEM or _ENV_CONTROL.search(value):
            raise ParamsRefused(field, 'the value must be one line of text, at most 4096 characters')


def child_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a llama-server: the allowed part of `base`, then `extra` (already checked)."""
    env = {
        k: v
        for k, v in base.items()
        if (k in INHERITED_ENV or k.startswith(INHERITED_PREFIXES)) and k != 'GGML_BACKEND_PATH'
    }
    env.update(extra or {})
    return env
