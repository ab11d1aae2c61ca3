"""The lazy GGUF header reader: values match what the generator wrote and what gguf.GGUFReader decodes;
corrupt files give a clear GGUFError quickly and never a read past the end."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from core.library.gguf_header import ArrayInfo, GGUFError, is_gguf, read_header, skip_strings
from core.library.meta import FileInfo, summarise
from tests.gguf_factory import CHATML, write_header_heavy_gguf, write_mmproj_gguf, write_tiny_gguf


@pytest.mark.parametrize(
    ('quant', 'label', 'wtype'), [('f32', 'F32', 'F32'), ('f16', 'F16', 'F16'), ('q8_0', 'Q8_0', 'Q8_0')]
)
def test_header_values_match_the_generator_and_gguf_reader(tmp_path: Path, quant: str, label: str, wtype: str):
    path = write_tiny_gguf(
        tmp_path / f'm-{quant}.gguf',
        name=f'tiny {quant}',
        quant=quant,
        vocab_size=600,
        n_layer=3,
        n_embd=64,
        n_head=4,
        n_head_kv=2,
        n_ff=128,
        ctx=4096,
    )
    h = read_header(path)
    assert h.version == 3
    assert h.kv['general.architecture'] == 'llama'
    assert h.kv['general.name'] == f'tiny {quant}'
    assert h.kv['llama.context_length'] == 4096
    assert h.kv['llama.block_count'] == 3
    assert h.kv['llama.attention.head_count_kv'] == 2
    assert h.kv['tokenizer.chat_template'] == CHATML
    assert h.kv['tokenizer.ggml.tokens'] == ArrayInfo('STRING', 600)
    assert h.kv['tokenizer.ggml.scores'] == ArrayInfo('FLOAT32', 600)

    ref = gguf.GGUFReader(path)
    assert h.data_offset == ref.data_offset
    assert [t.name for t in h.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(h.tensors, ref.tensors, strict=True):
        assert mine.shape == tuple(int(x) for x in theirs.shape)
        assert mine.ggml_type == theirs.tensor_type
        assert mine.n_bytes == theirs.n_bytes
        assert h.data_offset + mine.offset == theirs.data_offset

    meta = summarise(FileInfo.from_header(h).kv, FileInfo.from_header(h).tensors)
    assert meta.file_type == label
    assert meta.n_params == sum(int(t.n_elements) for t in ref.tensors)
    assert meta.vocab_size == 600 and meta.embedding_length == 64 and meta.head_count == 4
    assert meta.tensor_types == dict(Counter(t.tensor_type.name for t in ref.tensors))
    two_d = 2 + 3 * 7  # token_embd, output and 7 matrices per block; the norms stay F32
    assert meta.tensor_types[wtype] == two_d + (1 + 3 * 2 if wtype == 'F32' else 0)
    assert meta.tensor_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert sum(meta.layer_bytes) + meta.input_bytes + meta.output_bytes == meta.tensor_bytes


def test_quant_label_falls_back_to_the_dominant_tensor_type(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / 'nolabel.gguf', quant='q8_0', file_type_label=False)
    info = FileInfo.from_header(read_header(path))
    assert 'general.file_type' not in info.kv
    assert summarise(info.kv, info.tensors).file_type == 'Q8_0'


def test_header_heavy_vocab_is_skipped_not_decoded(tmp_path: Path):
    path = write_header_heavy_gguf(tmp_path / 'heavy.gguf', vocab_size=150_000, n_tensors=300)
    h = read_header(path)
    assert h.kv['tokenizer.ggml.tokens'] == ArrayInfo('STRING', 150_000)
    assert len(h.tensors) == 300
    assert h.kv['tokenizer.chat_template'] == CHATML  # keys after the big arrays are read correctly
    assert [t.shape for t in h.tensors] == [(8,)] * 300
    last = h.tensors[-1]  # the data of the last tensor ends the file (GGUFReader takes seconds here)
    assert 0 <= path.stat().st_size - (h.data_offset + last.offset + 32) < 32


def test_string_arrays_the_fast_path_refuses_are_walked(tmp_path: Path):
    """Long (>= 256 bytes), empty and NUL-holding strings defeat the numpy shortcut; the walk must be exact."""
    odd = [f'w{i}' for i in range(200)]
    odd[10] = 'x' * 300
    odd[20] = ''
    odd[30] = 'a\0b'
    path = write_tiny_gguf(tmp_path / 'odd.gguf', extra_kv={'test.odd_strings': odd, 'test.after': 'still here'})
    h = read_header(path)
    assert h.kv['test.odd_strings'] == ArrayInfo('STRING', 200)
    assert h.kv['test.after'] == 'still here'
    assert h.data_offset == gguf.GGUFReader(path).data_offset


@pytest.mark.parametrize(
    ('lengths', 'nul'),
    [
        ([3, 5, 1, 7] * 100, False),
        ([0, 4, 9] * 50, False),
        ([300, 2, 3] * 40, False),
        ([5] * 1000, False),
        ([6, 2, 11, 4] * 300, True),
        ([0] * 50, False),
        ([1000] * 5 + [4] * 500, False),
    ],
)
@pytest.mark.parametrize('misalign', [0, 1, 2, 3])
def test_numpy_string_skip_is_exact(lengths: list[int], nul: bool, misalign: int):
    """Whatever the strings (long, empty, NUL bytes) and alignment, the skip lands exactly on the next key."""
    rng = np.random.default_rng(7)
    items = [bytes(rng.integers(1, 256, n, dtype=np.uint8)) for n in lengths]
    if nul:
        items = [b[:1] + b'\0' + b[2:] if i % 7 == 0 else b for i, b in enumerate(items)]
    body = b''.join(struct.pack('<Q', len(b)) + b for b in items)
    pad = b'\0' * misalign
    buf = pad + body + struct.pack('<Q', 21) + b'tokenizer.ggml.scores' + b'\x07' * 64
    assert skip_strings(buf, misalign, len(items), len(buf)) == misalign + len(body)
    with pytest.raises(GGUFError, match='truncated'):
        skip_strings(buf, misalign, len(items), misalign + len(body) - 1)


def test_mmproj_header(tmp_path: Path):
    info = FileInfo.from_header(read_header(write_mmproj_gguf(tmp_path / 'mmproj-x.gguf')))
    meta = summarise(info.kv, info.tensors)
    assert meta.architecture == 'clip' and meta.general_type == 'mmproj' and meta.is_projector
    assert info.kv['clip.vision.image_mean'] == pytest.approx([0.5, 0.5, 0.5])


def _patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset : offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def _value_offset(raw: bytes, key: str) -> int:
    """Offset of the value of `key` (after its u32 type)."""
    return raw.index(key.encode()) + len(key) + 4


@pytest.fixture(scope='module')
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp('good') / 'good.gguf', name='good')


CORRUPTIONS = {
    'bad magic': (lambda raw: (0, b'GGML'), 'bad magic'),
    'wrong version': (lambda raw: (4, struct.pack('<I', 7)), 'unsupported GGUF version 7'),
    'version 1': (lambda raw: (4, struct.pack('<I', 1)), 'unsupported GGUF version 1'),
    'tensor count 2**60': (lambda raw: (8, struct.pack('<Q', 2**60)), 'tensor count'),
    'kv count 2**60': (lambda raw: (16, struct.pack('<Q', 2**60)), 'key/value count'),
    'string past the end': (lambda raw: (_value_offset(raw, 'general.name'), struct.pack('<Q', 2**40)), 'truncated'),
    'array count 2**60': (
        lambda raw: (_value_offset(raw, 'tokenizer.ggml.tokens') + 4, struct.pack('<Q', 2**60)),
        'tokenizer.ggml.tokens length',
    ),
    'value type 99': (lambda raw: (_value_offset(raw, 'general.name') - 4, struct.pack('<I', 99)), 'unknown value'),
    'tensor dims 9': (lambda raw: (raw.index(b'token_embd.weight') + 17, struct.pack('<I', 9)), 'dimensions'),
}


@pytest.mark.parametrize('case', list(CORRUPTIONS))
def test_corrupt_headers_fail_clearly(tmp_path: Path, good: Path, case: str):
    make, message = CORRUPTIONS[case]
    raw = good.read_bytes()
    offset, data = make(raw)
    bad = _patched(good, tmp_path / f'{case}.gguf', offset, data)
    with pytest.raises(GGUFError, match=message):
        read_header(bad)


@pytest.mark.parametrize('keep', [0, 3, 24, 100, 2000, 'header_end', 'data_half'])
def test_truncated_files_fail_clearly(tmp_path: Path, good: Path, keep: int | str):
    raw = good.read_bytes()
    cut = {'header_end': gguf.GGUFReader(good).data_offset, 'data_half': len(raw) // 2}.get(keep, keep)  # type: ignore[call-overload]
    bad = tmp_path / 'cut.gguf'
    bad.write_bytes(raw[:cut])
    with pytest.raises(GGUFError, match=r'truncated|too short'):
        read_header(bad)


def test_header_only_file_is_reported_truncated(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / 'h.gguf', header_only=True)
    with pytest.raises(GGUFError, match='tensor data ends'):
        read_header(path)


def test_fifo_is_refused_without_blocking(tmp_path: Path):
    import os

    fifo = tmp_path / 'pipe.gguf'
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match='not a regular file'):
        read_header(fifo)
    assert not is_gguf(fifo)


def test_is_gguf(tmp_path: Path, good: Path):
    (tmp_path / 'x.bin').write_bytes(b'PK\x03\x04 zip')
    assert is_gguf(good)
    assert not is_gguf(tmp_path / 'x.bin')
    assert not is_gguf(tmp_path / 'missing.bin')
