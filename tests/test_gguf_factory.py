"""Tests for the GGUF test-data factory (no llama-server needed)."""

import hashlib
import struct
import time

import gguf
import numpy as np
import pytest

from tests.gguf_factory import (
    CHATML,
    main,
    write_header_heavy_gguf,
    write_mmproj_gguf,
    write_split_gguf,
    write_tiny_gguf,
)


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize('quant', ['f32', 'f16', 'q8_0'])
def test_deterministic_and_seed_sensitive(tmp_path, quant):
    a = write_tiny_gguf(tmp_path / 'a.gguf', quant=quant)
    b = write_tiny_gguf(tmp_path / 'b.gguf', quant=quant)
    c = write_tiny_gguf(tmp_path / 'c.gguf', quant=quant, seed=1)
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


@pytest.mark.parametrize(
    'quant,ftype,wtype,max_kb',
    [
        ('f32', 0, gguf.GGMLQuantizationType.F32, 700),
        ('f16', 1, gguf.GGMLQuantizationType.F16, 400),
        ('q8_0', 7, gguf.GGMLQuantizationType.Q8_0, 250),
    ],
)
def test_structure(tmp_path, quant, ftype, wtype, max_kb):
    p = write_tiny_gguf(tmp_path / 'm.gguf', name='unit-model', quant=quant)
    assert p.stat().st_size < max_kb * 1024
    r = gguf.GGUFReader(p)
    assert field(r, 'general.architecture') == 'llama'
    assert field(r, 'general.name') == 'unit-model'
    assert field(r, 'general.file_type') == ftype
    assert field(r, 'llama.rope.dimension_count') == 64 // 4
    assert field(r, 'llama.block_count') == 2
    assert field(r, 'llama.context_length') == 2048
    assert field(r, 'tokenizer.ggml.model') == 'llama'
    assert field(r, 'tokenizer.chat_template') == CHATML
    tokens = field(r, 'tokenizer.ggml.tokens')
    assert len(tokens) == 512 and len(set(tokens)) == 512
    assert tokens[field(r, 'tokenizer.ggml.eos_token_id')] == '<|im_end|>'
    assert '<0x0A>' in tokens and '<|im_start|>' in tokens
    assert len(r.tensors) == 3 + 2 * 9
    t = {t.name: t for t in r.tensors}
    assert t['token_embd.weight'].tensor_type == wtype
    assert t['output_norm.weight'].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(t['blk.1.attn_k.weight'].shape) == [64, 2 * 16]  # GGUF order: (in, out)
    assert list(t['blk.0.ffn_down.weight'].shape) == [128, 64]


def test_options(tmp_path):
    p = write_tiny_gguf(
        tmp_path / 'm.gguf',
        file_type_label=False,
        chat_template=None,
        extra_kv={
            'general.author': 'me',
            'llama.context_length': 4096,
            'x.flag': True,
            'x.ratio': 0.5,
            'x.list': [1, 2, 3],
        },
        n_tensors_extra=5,
    )
    r = gguf.GGUFReader(p)
    assert 'general.file_type' not in r.fields and 'tokenizer.chat_template' not in r.fields
    assert field(r, 'general.author') == 'me'
    assert field(r, 'llama.context_length') == 4096
    assert field(r, 'x.flag') is True and field(r, 'x.list') == [1, 2, 3]
    assert len(r.tensors) == 21 + 5
    with pytest.raises(ValueError):
        write_tiny_gguf(tmp_path / 'bad.gguf', quant='q8_0', n_embd=48, n_head=4, n_head_kv=2)


def test_weights_suppress_reserved_tokens(tmp_path):
    # The logit trick (see _weights): reserved rows only weight the constant dim 0, negatively.
    r = gguf.GGUFReader(write_tiny_gguf(tmp_path / 'm.gguf'))
    t = {t.name: np.array(t.data) for t in r.tensors}
    out, emb = t['output.weight'], t['token_embd.weight']
    assert (out[:261, 0] < 0).all() and not out[:261, 1:].any()
    assert not out[261:, 0].any() and out[261:].std() > 0.1
    assert (emb[:, 0] > 0).all()
    assert not t['blk.0.attn_output.weight'][0].any() and not t['blk.1.ffn_down.weight'][0].any()


def test_header_only(tmp_path):
    p = write_tiny_gguf(tmp_path / 'h.gguf', vocab_size=150_000, header_only=True)
    full_data = 150_000 * 64 * 4 * 2
    assert 1_000_000 < p.stat().st_size < full_data  # vocab is there, tensor data is not
    assert p.read_bytes()[:4] == b'GGUF'


def test_header_heavy_is_fast(tmp_path):
    t0 = time.perf_counter()
    p = write_header_heavy_gguf(tmp_path / 'hh.gguf')  # 150k vocab, 300 tensors
    assert time.perf_counter() - t0 < 1.0
    assert p.stat().st_size < 8 * 1024 * 1024
    magic, version, n_tensors, n_kv = struct.unpack('<4sIQQ', p.read_bytes()[:24])
    assert (magic, version, n_tensors) == (b'GGUF', 3, 300) and n_kv > 20


def test_header_heavy_is_valid(tmp_path):
    # smaller vocab only because GGUFReader parses a 150k-string array slowly (~7 s)
    p = write_header_heavy_gguf(tmp_path / 'hh.gguf', vocab_size=5000, name='hh')
    r = gguf.GGUFReader(p)
    assert len(field(r, 'tokenizer.ggml.tokens')) == 5000
    assert len(r.tensors) == 300
    assert field(r, 'general.name') == 'hh'
    assert field(r, 'general.file_type') == 7


def test_split(tmp_path):
    paths = write_split_gguf(tmp_path, 'base', n_parts=3)
    assert [p.name for p in paths] == [f'base-0000{i}-of-00003.gguf' for i in (1, 2, 3)]
    readers = [gguf.GGUFReader(p) for p in paths]
    assert [field(r, 'split.no') for r in readers] == [0, 1, 2]
    assert all(field(r, 'split.count') == 3 for r in readers)
    assert all(field(r, 'split.tensors.count') == 21 for r in readers)
    assert sum(len(r.tensors) for r in readers) == 21
    assert field(readers[0], 'general.architecture') == 'llama'
    assert 'tokenizer.ggml.tokens' in readers[0].fields
    assert 'tokenizer.ggml.tokens' not in readers[1].fields


def test_mmproj(tmp_path):
    r = gguf.GGUFReader(write_mmproj_gguf(tmp_path / 'mmproj.gguf'))
    assert field(r, 'general.architecture') == 'clip'
    assert field(r, 'general.type') == 'mmproj'


def test_cli(tmp_path, capsys):
    out = tmp_path / 'cli.gguf'
    main([str(out), '--name', 'cli-model', '--seed', '3', '--quant', 'q8_0', '--vocab-size', '600'])
    r = gguf.GGUFReader(out)
    assert field(r, 'general.name') == 'cli-model'
    assert len(field(r, 'tokenizer.ggml.tokens')) == 600
    assert sha(out) == sha(
        write_tiny_gguf(tmp_path / 'same.gguf', name='cli-model', seed=3, quant='q8_0', vocab_size=600)
    )
