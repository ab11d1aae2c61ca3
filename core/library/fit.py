"""Will a model fit? An estimate of the memory llama-server will take, before anything is loaded.

Formula (mirrors how llama.cpp allocates; checked against llama-server's own load log in tests/test_library_fit.py):

* Weights: the tensor sizes from the header (elements / block size x type size, `gguf.GGML_QUANT_SIZES`).
  With `-ngl N` llama.cpp offloads the *last* N blocks (`blk.i` for i >= n_layer - N); the output head
  (`output.weight`, `output_norm`) goes to the GPU only when N > n_layer; the token embeddings stay on the CPU.
  No GPU means everything is on the CPU.
* KV cache: for every layer, K = ctx x n_head_kv x key_length x bytes(type_k) and
  V = ctx x n_head_kv x value_length x bytes(type_v); with the usual key_length = value_length = head_dim
  that is 2 x n_layer x ctx x n_head_kv x head_dim x bytes per element. ctx is the total context (`-c`, or the
  model's training context when 0/unset): llama-server shares it among its parallel slots, it is not multiplied.
  llama.cpp pads ctx to a multiple of 256. Each layer's KV lives where the layer lives.
* Compute buffer (calibrated on llama-server's `compute buffer size` lines; the graph is reserved for one
  ubatch and a few output rows, so the vocabulary hardly counts): n_ubatch x (2 x ctx_attn + 12 x (n_embd + n_ff))
  -- the f16 attention mask plus the widest f32 activations -- plus 4 x n_vocab x n_seq output logits.
  ctx_attn is the whole context when the KV cache is unified (llama-server's default with `-np` unset, 4 slots)
  and ctx / parallel with an explicit `-np`. With flash attention off (`-fa off`; the default `auto` turns it
  on where it can) the f32 attention scores add n_ubatch x ctx_attn x n_head x 4. n_ubatch is `-ub`
  (default 512), capped by `-b`. It sits on the GPU when any layer is offloaded, else on the CPU.

The label compares the total per device with free memory (psutil `available` RAM; free VRAM from NVML via
`core.gpu`): `fits` when it needs at most 85 % of what is free (room for the runtime and fragmentation),
`tight` up to 100 %, else `does not fit`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psutil
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from core.library.meta import ModelMeta

log = logging.getLogger(__name__)

FitLabel = Literal['fits', 'tight', 'does not fit', 'unknown']
FITS_SHARE = 0.85
CTX_PAD = 256
DEFAULT_UBATCH = 512
AUTO_SLOTS = 4  # llama-server's `-np -1` (auto)
DEFAULT_CTX = 4096  # used only when a header has no context length
KV_TYPES = ('f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_1', 'iq4_nl', 'q5_0', 'q5_1')


@dataclass(slots=True)
class FitEstimate:
    label: FitLabel
    ctx_size: int
    n_gpu_layers: int  # layers actually counted on the GPU (0 without a GPU)
    parallel: int
    cache_type_k: str
    cache_type_v: str
    weights_bytes: int
    weights_gpu_bytes: int
    weights_cpu_bytes: int
    kv_bytes: int
    kv_gpu_bytes: int
    compute_bytes: int
    ram_needed_bytes: int
    vram_needed_bytes: int
    ram_free_bytes: int | None
    vram_free_bytes: int | None  # with RPC workers: the local GPU's and theirs
    rpc_free_bytes: int | None = None  # what the model's RPC workers offer (None: it has none)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_bytes_per_element(cache_type: str) -> float:
    qt = GGMLQuantizationType[cache_type.upper()]
    block, size = GGML_QUANT_SIZES[qt]
    return size / block


def free_memory() -> tuple[int | None, int | None]:
    """(available RAM, free VRAM or None without an NVIDIA GPU)."""
    ram = int(psutil.virtual_memory().available)
    try:
        from core.gpu import free_vram_bytes  # the metrics service owns NVML
    except ImportError:
        return ram, None
    try:
        return ram, free_vram_bytes()
    except Exception:
        log.debug('free VRAM unavailable', exc_info=True)
        return ram, None


def estimate(
    meta: ModelMeta,
    params: Any = None,
    *,
    ram_free: int | None = None,
    vram_free: int | None = None,
    rpc_free: list[int | None] | None = None,
) -> FitEstimate:
    """`params`: ModelParams, a dict or None; uses ctx_size, n_gpu_layers, parallel, batch_size, ubatch_size,
    flash_attn, cache_type_k, cache_type_v and rpc. Free memory is passed in (see `free_memory`); `rpc_free`: the
    free memory of each worker in `rpc` (None where unknown). Workers are devices like a GPU: offloaded layers are
    spread over the local GPU and the workers, so their memory adds to the GPU's."""
    p = _params(params)
    notes: list[str] = []
    n_layer = meta.block_count or len(meta.layer_bytes)
    workers = list(p.get('rpc') or [])
    rpc_known: int | None = None
    if workers:
        offered = list(rpc_free or [])
        offered += [None] * (len(workers) - len(offered))
        for endpoint, free in zip(workers, offered, strict=False):
            if free is None:
                notes.append(f'RPC worker {endpoint}: its memory is unknown here (counted as none)')
        rpc_known = sum(f for f in offered if f is not None)
        vram_free = (vram_free or 0) + rpc_known
    has_gpu = vram_free is not None

    # --- weights -------------------------------------------------------------------------------------------
    ngl = p.get('n_gpu_layers')
    if not has_gpu:
        ngl_eff = 0
    elif ngl is None or ngl < 0:
        ngl_eff = n_layer + 1  # llama-server's default (`auto`/`all`) offloads everything that fits
    else:
        ngl_eff = min(int(ngl), n_layer + 1)
    first_gpu_layer = max(n_layer - ngl_eff, 0)
    on_gpu = [ngl_eff > 0 and i >= first_gpu_layer for i in range(n_layer)]
    output_on_gpu = ngl_eff > n_layer
    layer_bytes = meta.layer_bytes or [0] * n_layer
    w_gpu = sum(b for b, g in zip(layer_bytes, on_gpu, strict=False) if g) + (meta.output_bytes if output_on_gpu else 0)
    w_total = meta.tensor_bytes
    w_cpu = w_total - w_gpu

    # --- KV cache --------------------------------------------------------------------------------------------
    ctx = int(p.get('ctx_size') or 0) or meta.context_length or DEFAULT_CTX
    if not meta.context_length and not p.get('ctx_size'):
        notes.append(f'no context length in the header; assumed {DEFAULT_CTX}')
    ctx_padded = -(-ctx // CTX_PAD) * CTX_PAD
    type_k = str(p.get('cache_type_k') or 'f16').lower()
    type_v = str(p.get('cache_type_v') or 'f16').lower()
    head_dim = (meta.embedding_length // meta.head_count) if meta.embedding_length and meta.head_count else 0
    k_dim = meta.key_length or head_dim
    v_dim = meta.value_length or head_dim
    per_layer_heads = meta.head_count_kv_per_layer or [meta.head_count_kv or 0] * n_layer
    kv_gpu = kv_total = 0.0
    for i, heads in enumerate(per_layer_heads[:n_layer]):
        layer = ctx_padded * heads * (k_dim * kv_bytes_per_element(type_k) + v_dim * kv_bytes_per_element(type_v))
        kv_total += layer
        if i < len(on_gpu) and on_gpu[i]:
            kv_gpu += layer
    if not k_dim or not per_layer_heads:
        notes.append('attention shape unknown (recurrent or unusual architecture): KV cache not estimated')

    # --- compute buffer --------------------------------------------------------------------------------------
    n_ubatch = int(p.get('ubatch_size') or DEFAULT_UBATCH)
    if p.get('batch_size'):
        n_ubatch = min(n_ubatch, int(p['batch_size']))
    parallel = int(p.get('parallel') or AUTO_SLOTS)
    ctx_attn = ctx_padded if not p.get('parallel') else -(-ctx_padded // parallel)
    n_vocab = meta.vocab_size or 0
    width = (meta.embedding_length or 0) + (meta.feed_forward_length or 0)
    compute = n_ubatch * (2 * ctx_attn + 12 * width) + 4 * n_vocab * parallel
    if p.get('flash_attn') == 'off':
        compute += n_ubatch * ctx_attn * (meta.head_count or 0) * 4
    compute_on_gpu = ngl_eff > 0

    ram_needed = int(w_cpu + (kv_total - kv_gpu) + (0 if compute_on_gpu else compute))
    vram_needed = int(w_gpu + kv_gpu + (compute if compute_on_gpu else 0))
    label = _worst(_label(ram_needed, ram_free), _label(vram_needed, vram_free) if vram_needed else 'fits')
    return FitEstimate(
        label=label,
        ctx_size=ctx,
        n_gpu_layers=ngl_eff,
        parallel=parallel,
        cache_type_k=type_k,
        cache_type_v=type_v,
        weights_bytes=w_total,
        weights_gpu_bytes=w_gpu,
        weights_cpu_bytes=w_cpu,
        kv_bytes=int(kv_total),
        kv_gpu_bytes=int(kv_gpu),
        compute_bytes=int(compute),
        ram_needed_bytes=ram_needed,
        vram_needed_bytes=vram_needed,
        ram_free_bytes=ram_free,
        vram_free_bytes=vram_free,
        rpc_free_bytes=rpc_known,
        notes=notes,
    )


def _params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, dict):
        return {k: v for k, v in params.items() if v is not None}
    dump = getattr(params, 'model_dump', None)
    if dump is not None:
        return {k: v for k, v in dump().items() if v is not None}
    return {k: v for k, v in vars(params).items() if v is not None}


def _label(needed: int, free: int | None) -> FitLabel:
    if free is None:
        return 'unknown'
    if needed <= FITS_SHARE * free:
        return 'fits'
    if needed <= free:
        return 'tight'
    return 'does not fit'


_ORDER: dict[FitLabel, int] = {'fits': 0, 'unknown': 1, 'tight': 2, 'does not fit': 3}


def _worst(a: FitLabel, b: FitLabel) -> FitLabel:
    return a if _ORDER[a] >= _ORDER[b] else b
