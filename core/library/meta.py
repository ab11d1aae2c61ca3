"""What a model is, summarised from its GGUF header: the fields the UI, the fit estimate and the proxy use."""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gguf import LlamaFileType

from core.library.gguf_header import ArrayInfo, GGUFHeader

# Architectures llama.cpp runs as embedding models (no chat); pooling_type marks others.
EMBEDDING_ARCHS = frozenset(
    {
        'bert',
        'nomic-bert',
        'nomic-bert-moe',
        'jina-bert-v2',
        'jina-bert-v3',
        't5encoder',
        'modern-bert',
        'neo-bert',
        'gte',
        'xlm-roberta',
    }
)
PROJECTOR_ARCHS = frozenset({'clip'})
_BLOCK = re.compile(r'^blk\.(\d+)\.')
CHAT_TEMPLATE_KEY = 'tokenizer.chat_template'


@dataclass(slots=True)
class ModelMeta:
    """Header summary. Attribute access, plus `meta['key']` / `meta.get('key')` for dict-minded callers."""

    architecture: str | None = None
    name: str | None = None
    basename: str | None = None
    size_label: str | None = None
    general_type: str | None = None
    n_params: int = 0
    file_type: str | None = None  # quantization label, e.g. Q4_K_M
    context_length: int | None = None
    embedding_length: int | None = None
    feed_forward_length: int | None = None
    block_count: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    head_count_kv_per_layer: list[int] | None = None
    key_length: int | None = None
    value_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    vocab_size: int | None = None
    tokenizer_model: str | None = None
    has_chat_template: bool = False
    pooling_type: int | None = None
    rope_scaling: dict[str, Any] | None = None
    tensor_count: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    tensor_bytes: int = 0
    layer_bytes: list[int] = field(default_factory=list)  # weights of blk.i, for layer offload
    output_bytes: int = 0  # output head + final norm (offloaded with the last layer + 1)
    input_bytes: int = 0  # token embeddings and anything outside the blocks (kept on the CPU)

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def is_projector(self) -> bool:
        return self.general_type in ('mmproj', 'clip') or self.architecture in PROJECTOR_ARCHS


def file_type_label(value: Any) -> str | None:
    """`general.file_type` (LlamaFileType) as a label: MOSTLY_Q4_K_M -> Q4_K_M, ALL_F32 -> F32."""
    try:
        name = LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None
    return None if name == 'GUESSED' else name.removeprefix('MOSTLY_').removeprefix('ALL_')


@dataclass(slots=True)
class TensorStats:
    """What the tensor infos of one file (or all parts of a split model) add up to."""

    count: int = 0
    n_params: int = 0
    total_bytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    weight_bytes_by_type: dict[str, int] = field(default_factory=dict)  # 2-D+ tensors only
    block_bytes: dict[int, int] = field(default_factory=dict)  # blk.N -> bytes
    output_bytes: int = 0
    input_bytes: int = 0

    @classmethod
    def from_header(cls, header: GGUFHeader) -> TensorStats:
        st = cls()
        types: Counter[str] = Counter()
        weights: Counter[str] = Counter()
        blocks: Counter[int] = Counter()
        for t, nbytes in zip(header.tensors, _tensor_sizes(header), strict=True):
            st.n_params += t.n_elements
            st.total_bytes += nbytes
            types[t.type_name] += 1
            if len(t.shape) >= 2:
                weights[t.type_name] += nbytes
            m = _BLOCK.match(t.name)
            if m:
                blocks[int(m.group(1))] += nbytes
            elif t.name.startswith(('output.', 'output_norm.')):
                st.output_bytes += nbytes
            else:
                st.input_bytes += nbytes
        st.count = len(header.tensors)
        st.types, st.weight_bytes_by_type, st.block_bytes = dict(types), dict(weights), dict(blocks)
        return st

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorStats:
        d = dict(d)
        d['block_bytes'] = {int(k): v for k, v in d.get('block_bytes', {}).items()}  # JSON keys are strings
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def merged(cls, parts: list[TensorStats]) -> TensorStats:
        out = cls()
        types: Counter[str] = Counter()
        weights: Counter[str] = Counter()
        blocks: Counter[int] = Counter()
        for p in parts:
            out.count += p.count
            out.n_params += p.n_params
            out.total_bytes += p.total_bytes
            out.output_bytes += p.output_bytes
            out.input_bytes += p.input_bytes
            types.update(p.types)
            weights.update(p.weight_bytes_by_type)
            blocks.update(p.block_bytes)
        out.types, out.weight_bytes_by_type, out.block_bytes = dict(types), dict(weights), dict(blocks)
        return out


@dataclass(slots=True)
class FileInfo:
    """One file's header, reduced to what is cached: JSON-ready key/values and tensor totals."""

    version: int
    kv: dict[str, Any]
    tensors: TensorStats

    @classmethod
    def from_header(cls, header: GGUFHeader) -> FileInfo:
        return cls(header.version, kv_to_json(header.kv), TensorStats.from_header(header))

    def as_dict(self) -> dict[str, Any]:
        return {'version': self.version, 'kv': self.kv, 'tensors': self.tensors.as_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileInfo:
        return cls(d['version'], d['kv'], TensorStats.from_dict(d['tensors']))


def summarise(kv: dict[str, Any], stats: TensorStats) -> ModelMeta:
    """The model summary from the first file's key/values (JSON form) and the tensors of all its parts."""
    arch = _str(kv.get('general.architecture'))

    def a(key: str) -> Any:
        return kv.get(f'{arch}.{key}')

    hkv = a('attention.head_count_kv')
    head_count = _int(a('attention.head_count'))
    per_layer = [int(x) for x in hkv] if isinstance(hkv, list) and all(isinstance(x, int) for x in hkv) else None
    if isinstance(hkv, int) and not isinstance(hkv, bool):
        head_count_kv: int | None = hkv
    elif per_layer:
        head_count_kv = max(per_layer)
    else:
        head_count_kv = head_count  # no GQA key means one KV head per query head

    n_layer = _int(a('block_count'))
    meta = ModelMeta(
        architecture=arch,
        name=_str(kv.get('general.name')),
        basename=_str(kv.get('general.basename')),
        size_label=_str(kv.get('general.size_label')),
        general_type=_str(kv.get('general.type')),
        n_params=stats.n_params,
        file_type=file_type_label(kv.get('general.file_type')) or _dominant(stats.weight_bytes_by_type),
        context_length=_int(a('context_length')),
        embedding_length=_int(a('embedding_length')),
        feed_forward_length=_int(a('feed_forward_length')),
        block_count=n_layer,
        head_count=head_count,
        head_count_kv=head_count_kv,
        head_count_kv_per_layer=per_layer,
        key_length=_int(a('attention.key_length')),
        value_length=_int(a('attention.value_length')),
        expert_count=_int(a('expert_count')),
        expert_used_count=_int(a('expert_used_count')),
        vocab_size=_int(a('vocab_size')) or _array_len(kv.get('tokenizer.ggml.tokens')),
        tokenizer_model=_str(kv.get('tokenizer.ggml.model')),
        has_chat_template=bool(kv.get(CHAT_TEMPLATE_KEY)),
        pooling_type=_int(a('pooling_type')),
        rope_scaling=_rope_scaling(kv, arch),
        tensor_count=stats.count,
        tensor_types=dict(sorted(stats.types.items(), key=lambda kv_: -kv_[1])),
        tensor_bytes=stats.total_bytes,
        layer_bytes=[stats.block_bytes.get(i, 0) for i in range(n_layer or 0)],
        output_bytes=stats.output_bytes,
        input_bytes=stats.input_bytes,
    )
    return meta


def capabilities(meta: ModelMeta, has_mmproj: bool) -> list[str]:
    caps = []
    embedding = meta.architecture in EMBEDDING_ARCHS or bool(meta.pooling_type)
    if embedding:
        caps.append('embedding')
    else:
        caps.append('completion')
        if meta.has_chat_template:
            caps.append('chat')
    if has_mmproj:
        caps.append('vision')
    return caps


def _tensor_sizes(header: GGUFHeader) -> list[int]:
    """Bytes per tensor: from the type's block size, else from the gap to the next tensor's data offset."""
    out = []
    by_offset = sorted(t.offset for t in header.tensors)
    data_len = max(0, header.file_size - header.data_offset)
    for t in header.tensors:
        if t.n_bytes is not None:
            out.append(t.n_bytes)
            continue
        i = bisect.bisect_right(by_offset, t.offset)
        out.append(max(0, (by_offset[i] if i < len(by_offset) else data_len) - t.offset))
    return out


def _dominant(weight_bytes_by_type: dict[str, int]) -> str | None:
    """Quant label when general.file_type is missing: the type holding most bytes among 2-D+ weights."""
    return max(weight_bytes_by_type.items(), key=lambda kv: kv[1])[0] if weight_bytes_by_type else None


def _rope_scaling(kv: dict[str, Any], arch: str | None) -> dict[str, Any] | None:
    prefix = f'{arch}.rope.scaling.'
    found = {k.removeprefix(prefix): v for k, v in kv.items() if k.startswith(prefix) and not isinstance(v, dict)}
    return found or None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
        return max(v)
    return None


def _array_len(v: Any) -> int | None:
    if isinstance(v, dict) and isinstance(v.get('length'), int):
        return v['length']
    if isinstance(v, list):
        return len(v)
    return None


def kv_to_json(kv: dict[str, Any]) -> dict[str, Any]:
    """All key/values as JSON-ready data; big arrays summarised as {"array": type, "length": n}."""
    return {k: v.as_dict() if isinstance(v, ArrayInfo) else v for k, v in kv.items()}


def kv_for_display(kv_json: dict[str, Any], include_chat_template: bool = False) -> dict[str, Any]:
    """`kv_to_json` output with the (long) chat template shown by length unless asked for."""
    out = dict(kv_json)
    tpl = out.get(CHAT_TEMPLATE_KEY)
    if isinstance(tpl, str) and not include_chat_template:
        out[CHAT_TEMPLATE_KEY] = {'string': 'chat template', 'length': len(tpl)}
    return out
