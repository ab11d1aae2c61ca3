"""Deterministic generator of tiny GGUF files: the first-run demo model (`core/library/demo.py`), and the tests
and benchmarks (through `tests/gguf_factory.py`).

* ``write_tiny_gguf``          - a real (random-weight) llama model that llama-server loads and serves.
* ``write_header_heavy_gguf``  - a big-vocab / many-tensor header with tiny data, for scan benchmarks.
* ``write_split_gguf``         - a tiny llama model split like ``gguf-split`` (``base-00001-of-00003.gguf``).
* ``write_mmproj_gguf``        - a small ``clip`` / ``mmproj`` projector file (not loadable).

Weights come from a counter-based hash (splitmix64 over uint64), never ``np.random``, so the
same arguments give byte-identical files on any numpy version.

CLI: ``python -m core.library.tiny_gguf OUT.gguf [--name N --seed S --quant q8_0 --vocab-size N]``
"""

from __future__ import annotations

import argparse
import itertools
import math
import string
import struct
import zlib
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import TokenType

CHATML = (  # raw strings: the template itself contains the two-char escape \n
    r'{% for message in messages %}'
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    '{% endfor %}'
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QUANTS = {  # quant name -> (tensor type for 2-D weights, general.file_type)
    'f32': (QT.F32, gguf.LlamaFileType.ALL_F32),
    'f16': (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    'q8_0': (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Vocab layout: specials, then the 256 byte-fallback tokens, then ordinary word pieces.
SPECIALS = [
    ('<unk>', TokenType.UNKNOWN),
    ('<s>', TokenType.CONTROL),
    ('</s>', TokenType.CONTROL),
    ('<|im_start|>', TokenType.CONTROL),
    ('<|im_end|>', TokenType.CONTROL),
]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 4  # eos = <|im_end|> (ChatML models do this; </s> also counts as EOG)
N_RESERVED = len(SPECIALS) + 256  # ids below this are never sampled (see _weights)
WORDS = (
    'the a an and of to in is it that for on with as was he she they we you be at by this '
    'have from or one had not but what all were when there can said which do their time if '
    'will way about many then them would write like so these her long make thing see him two '
    'has look more day could go come did my sound no most number who over know water than call '
    'first people may down side been now find any new work part take get place made live where '
    'after back little only round man year came show every good me give our under name very'
).split()
TENSORS_PER_LAYER = (
    'attn_norm',
    'attn_q',
    'attn_k',
    'attn_v',
    'attn_output',
    'ffn_norm',
    'ffn_gate',
    'ffn_up',
    'ffn_down',
)


# ---------------------------------------------------------------- deterministic numbers


def _hash_floats(key: str, seed: int, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform floats with the given std, from splitmix64 over a counter keyed by (seed, key)."""
    n = math.prod(shape)
    with np.errstate(over='ignore'):
        z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64((seed * 0x100000001B3 + zlib.crc32(key.encode())) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # exact, in [0, 1)
    return ((u * 2.0 - 1.0) * (std * math.sqrt(3.0))).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------- vocab + metadata


def _word_pieces(n: int) -> list[str]:
    """n unique printable SentencePiece pieces: letters, common words (with every prefix, since
    SPM only merges pairs whose concatenation is in the vocab), then letter combos."""
    seen: dict[str, None] = {}
    lower = string.ascii_lowercase

    def gen():
        yield from lower
        yield from ('\u2581' + c for c in lower)
        yield from ('.', ',', '!', '?', "'", '-')
        for w in WORDS:
            yield from ('\u2581' + w[:i] for i in range(1, len(w) + 1))
        yield from ('\u2581' + c for c in string.ascii_uppercase + string.digits)
        for k in itertools.count(2):  # "ab", "▁ab", "ac", ... unbounded
            for t in itertools.product(lower, repeat=k):
                s = ''.join(t)
                yield s
                yield '\u2581' + s

    for p in gen():
        if len(seen) == n:
            break
        seen.setdefault(p)
    return list(seen)


def _vocab(vocab_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    if vocab_size < N_RESERVED + 64:
        raise ValueError(f'vocab_size must be >= {N_RESERVED + 64}')
    pieces = _word_pieces(vocab_size - N_RESERVED)
    tokens = [t for t, _ in SPECIALS] + [f'<0x{b:02X}>' for b in range(256)] + pieces
    types = np.array(
        [ty for _, ty in SPECIALS] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces), dtype=np.int32
    )
    # SentencePiece scores: earlier (more common) pieces score higher; specials/bytes 0.
    scores = np.zeros(vocab_size, dtype=np.float32)
    scores[N_RESERVED:] = -np.arange(len(pieces), dtype=np.float32)
    return tokens, scores, types


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that packs numpy / string arrays in bulk: the stock per-item packing makes a
    150k-token vocab take ~1 s; this keeps it to a few tens of ms. Output bytes are identical."""

    def _pack_val(self, val: Any, vtype: VT, add_vtype: bool, sub_type: VT | None = None) -> bytes:
        if vtype == VT.ARRAY and isinstance(val, np.ndarray):
            sub = {np.dtype(np.float32): VT.FLOAT32, np.dtype(np.int32): VT.INT32}[val.dtype]
            head = struct.pack('<IIQ', vtype, sub, len(val)) if add_vtype else struct.pack('<IQ', sub, len(val))
            return head + val.astype(val.dtype.newbyteorder('<')).tobytes()
        if vtype == VT.ARRAY and sub_type == VT.STRING:
            enc = [s.encode() for s in val]
            body = b''.join(struct.pack('<Q', len(b)) + b for b in enc)
            return (struct.pack('<I', vtype) if add_vtype else b'') + struct.pack('<IQ', VT.STRING, len(enc)) + body
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _add_llama_kv(
    w: gguf.GGUFWriter,
    *,
    name: str,
    vocab_size: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    ctx: int,
    chat_template: str | None,
) -> None:
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError('n_embd must divide by n_head, n_head by n_head_kv')
    w.add_type('model')
    w.add_name(name)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)  # must equal head_dim or llama.cpp says "invalid n_rot"
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab_size)
    tokens, scores, types = _vocab(vocab_size)
    w.add_tokenizer_model('llama')  # SentencePiece
    w.add_key_value('tokenizer.ggml.tokens', tokens, VT.ARRAY, sub_type=VT.STRING)
    w.add_key_value('tokenizer.ggml.scores', scores, VT.ARRAY)
    w.add_key_value('tokenizer.ggml.token_type', types, VT.ARRAY)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def _add_extra_kv(w: gguf.GGUFWriter, extra_kv: dict[str, Any] | None) -> None:
    """Values: bool/int(int32 or int64 if big)/float(float32)/str/list, or (value, GGUFValueType)."""
    for k, v in (extra_kv or {}).items():
        if isinstance(v, tuple):
            w.add_key_value(k, v[0], v[1])
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            (w.add_int32 if -(2**31) <= v < 2**31 else w.add_int64)(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_key_value(k, v, VT.STRING)  # add_string() silently drops ""
        else:
            w.add_array(k, list(v))


# ---------------------------------------------------------------- tensors


def _llama_tensor_shapes(vocab_size, n_layer, n_embd, n_head, n_head_kv, n_ff) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape); numpy shape is GGUF ne reversed, i.e. (out_features, in_features)."""
    kv = n_head_kv * (n_embd // n_head)
    per_layer = {
        'attn_norm': (n_embd,),
        'attn_q': (n_embd, n_embd),
        'attn_k': (kv, n_embd),
        'attn_v': (kv, n_embd),
        'attn_output': (n_embd, n_embd),
        'ffn_norm': (n_embd,),
        'ffn_gate': (n_ff, n_embd),
        'ffn_up': (n_ff, n_embd),
        'ffn_down': (n_embd, n_ff),
    }
    out = [
        ('token_embd.weight', (vocab_size, n_embd)),
        ('output_norm.weight', (n_embd,)),
        ('output.weight', (vocab_size, n_embd)),
    ]
    for i in range(n_layer):
        out += [(f'blk.{i}.{t}.weight', per_layer[t]) for t in TENSORS_PER_LAYER]
    return out


def _weights(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random weights, shaped so sampled replies are printable word pieces.

    Dimension 0 of the residual stream is a constant "bias unit": every token embedding has 1.0
    there and no layer writes to it (row 0 of attn_output / ffn_down is zero), so after the final
    RMS norm h[0] is always clearly positive. output.weight gives reserved tokens (unk, bos/eos,
    ChatML, <0xXX> bytes) a large negative weight on dim 0 and zeros elsewhere, so their logits sit
    far below every word piece and top-k/min-p never picks them. EOS is suppressed too: replies
    always run to max_tokens (finish_reason "length").
    """
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)  # norm weights
    if name == 'output.weight':
        w = _hash_floats(name, seed, shape, 0.5)
        w[:, 0] = 0.0
        w[:N_RESERVED] = 0.0
        w[:N_RESERVED, 0] = -16.0
        return w
    w = _hash_floats(name, seed, shape, 0.02)
    if name == 'token_embd.weight':
        w[:, 0] = 1.0 / 8  # kept small so the other dims still matter after the norm
    elif name.endswith(('attn_output.weight', 'ffn_down.weight')):
        w[0] = 0.0
    return w


def _encode(arr: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT]:
    if arr.ndim == 1 or qtype == QT.F32:
        return arr, QT.F32
    if qtype == QT.F16:
        return arr.astype(np.float16), QT.F16
    return gguf.quants.quantize(arr, qtype), qtype


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _check_quant(quant: str, n_embd: int, n_ff: int) -> QT:
    if quant not in QUANTS:
        raise ValueError(f'quant must be one of {sorted(QUANTS)}')
    qtype = QUANTS[quant][0]
    if qtype == QT.Q8_0 and (n_embd % 32 or n_ff % 32):
        raise ValueError('q8_0 needs n_embd and n_ff to be multiples of 32')
    return qtype


def _finish(w: gguf.GGUFWriter, header_only: bool = False) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if header_only:
        w.write_ti_data_to_file()
    else:
        w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- public API


def write_tiny_gguf(
    path,
    *,
    name: str = 'tiny-llama',
    seed: int = 0,
    quant: str = 'f32',
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    ctx: int = 2048,
    chat_template: str | None = CHATML,
    file_type_label: bool = True,
    extra_kv: dict[str, Any] | None = None,
    header_only: bool = False,
    n_tensors_extra: int = 0,
) -> Path:
    """Write a random-weight llama model that llama-server can load and serve.

    file_type_label=False omits general.file_type / general.quantization_version (to test
    inferring the quant from tensor types). extra_kv is added last and overrides existing keys.
    header_only=True writes KV + tensor infos with real shapes but no tensor data (a truncated
    file: cheap, for header scanners; not loadable). n_tensors_extra>0 appends that many tiny
    "extra.N.weight" tensors (llama.cpp then refuses the file: unexpected tensor count).
    """
    path = Path(path)
    qtype = _check_quant(quant, n_embd, n_ff)
    w = _Writer(path, 'llama')
    _add_llama_kv(
        w,
        name=name,
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        ctx=ctx,
        chat_template=chat_template,
    )
    if file_type_label:
        w.add_file_type(QUANTS[quant][1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_extra_kv(w, extra_kv)
    shapes = _llama_tensor_shapes(vocab_size, n_layer, n_embd, n_head, n_head_kv, n_ff)
    shapes += [(f'extra.{i}.weight', (32,)) for i in range(n_tensors_extra)]
    for tname, shape in shapes:
        if header_only:
            t = QT.F32 if len(shape) == 1 else qtype
            w.add_tensor_info(tname, shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=t)
        else:
            data, t = _encode(_weights(tname, shape, seed), qtype)
            w.add_tensor(tname, data, raw_dtype=t)
    _finish(w, header_only)
    return path


def write_header_heavy_gguf(
    path,
    *,
    vocab_size: int = 150_000,
    n_tensors: int = 300,
    name: str = 'header-heavy',
    seed: int = 0,
    quant: str = 'q8_0',
) -> Path:
    """Valid GGUF with a full llama header (big vocab, ChatML, general.file_type for `quant`) and
    n_tensors standard-named tensors whose data is tiny (8 floats each). GGUFReader reads it;
    llama-server would reject it (tensor shapes don't match the hparams)."""
    path = Path(path)
    n_layer = max(1, math.ceil((n_tensors - 3) / len(TENSORS_PER_LAYER)))
    w = _Writer(path, 'llama')
    _add_llama_kv(
        w,
        name=name,
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        n_ff=14336,
        ctx=32768,
        chat_template=CHATML,
    )
    w.add_file_type(QUANTS[quant][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = ['token_embd.weight', 'output_norm.weight', 'output.weight'] + [
        f'blk.{i}.{t}.weight' for i in range(n_layer) for t in TENSORS_PER_LAYER
    ]
    for tname in names[:n_tensors]:
        w.add_tensor(tname, _hash_floats(tname, seed, (8,), 0.02))
    _finish(w)
    return path


def write_split_gguf(directory, base_name: str, n_parts: int = 3, **kwargs: Any) -> list[Path]:
    """Tiny llama model split gguf-split style into ``{base}-0000i-of-0000n.gguf``: every part
    has split.no (u16), split.count (u16), split.tensors.count (i32); part 1 also carries all
    other metadata; tensors are spread evenly. kwargs go to write_tiny_gguf's model options."""
    directory = Path(directory)
    n = len(_llama_tensor_shapes(kwargs.get('vocab_size', 512), kwargs.get('n_layer', 2), 1, 1, 1, 1))
    if not 2 <= n_parts <= n:
        raise ValueError(f'n_parts must be in 2..{n}')
    # GGUFWriter splits by max tensors per part; pick the smallest cap that yields n_parts parts.
    per = next((p for p in range(1, n + 1) if math.ceil(n / p) == n_parts), None)
    if per is None:
        raise ValueError(f"{n} tensors can't be split evenly into {n_parts} parts")
    paths = _write_with_writer(directory / f'{base_name}.gguf', split_max_tensors=per, **kwargs)
    assert len(paths) == n_parts, paths
    return paths


def _write_with_writer(
    path: Path,
    *,
    split_max_tensors: int,
    name: str = 'tiny-llama-split',
    seed: int = 0,
    quant: str = 'f32',
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    ctx: int = 2048,
    chat_template: str | None = CHATML,
) -> list[Path]:
    qtype = _check_quant(quant, n_embd, n_ff)
    w = _Writer(path, 'llama', split_max_tensors=split_max_tensors)
    _add_llama_kv(
        w,
        name=name,
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        ctx=ctx,
        chat_template=chat_template,
    )
    w.add_file_type(QUANTS[quant][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tname, shape in _llama_tensor_shapes(vocab_size, n_layer, n_embd, n_head, n_head_kv, n_ff):
        data, t = _encode(_weights(tname, shape, seed), qtype)
        w.add_tensor(tname, data, raw_dtype=t)
    paths = w.format_shard_names(path)
    _finish(w)
    return paths


def write_mmproj_gguf(path, *, name: str = 'tiny-mmproj', seed: int = 0) -> Path:
    """Small multimodal projector file (general.architecture "clip", general.type "mmproj").
    Looks right to a metadata scanner; not loadable."""
    path = Path(path)
    w = _Writer(path, 'clip')
    w.add_type('mmproj')
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_bool('clip.has_vision_encoder', True)
    w.add_string('clip.projector_type', 'mlp')
    w.add_uint32('clip.vision.image_size', 224)
    w.add_uint32('clip.vision.patch_size', 14)
    w.add_uint32('clip.vision.embedding_length', 64)
    w.add_uint32('clip.vision.feed_forward_length', 128)
    w.add_uint32('clip.vision.projection_dim', 64)
    w.add_uint32('clip.vision.block_count', 1)
    w.add_uint32('clip.vision.attention.head_count', 4)
    w.add_float32('clip.vision.attention.layer_norm_epsilon', 1e-6)
    w.add_array('clip.vision.image_mean', [0.5, 0.5, 0.5])
    w.add_array('clip.vision.image_std', [0.5, 0.5, 0.5])
    for tname, shape in [
        ('v.patch_embd.weight', (64, 3, 14, 14)),
        ('v.position_embd.weight', (257, 64)),
        ('mm.0.weight', (64, 64)),
        ('mm.0.bias', (64,)),
    ]:
        w.add_tensor(tname, _hash_floats(tname, seed, shape, 0.02).astype(np.float16))
    _finish(w)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog='python -m core.library.tiny_gguf', description=__doc__.split('\n')[0])
    ap.add_argument('out')
    ap.add_argument('--name', default='tiny-llama')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--quant', choices=sorted(QUANTS), default='f32')
    ap.add_argument('--vocab-size', type=int, default=512)
    ap.add_argument('--header-heavy', action='store_true', help='write_header_heavy_gguf instead')
    a = ap.parse_args(argv)
    if a.header_heavy:
        p = write_header_heavy_gguf(a.out, vocab_size=a.vocab_size, name=a.name, seed=a.seed, quant=a.quant)
    else:
        p = write_tiny_gguf(a.out, name=a.name, seed=a.seed, quant=a.quant, vocab_size=a.vocab_size)
    print(f'{p} {p.stat().st_size} bytes')


if __name__ == '__main__':
    main()
