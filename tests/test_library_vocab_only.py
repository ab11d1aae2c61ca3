"""Vocab-only GGUFs, in the shape llama.cpp ships them (models/ggml-vocab-*.gguf): key/values, no tensors, no
alignment padding after them. gguf-py reads them; so must we, and list them as what they are."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from core.library.gguf_header import read_header


def write_vocab_only(path: Path, arch: str = 'qwen2', n_vocab: int = 300, endianess: Any = None) -> Path:
    """Like `convert_hf_to_gguf.py --vocab-only`: the tokenizer and hyper-parameters, no weights."""
    kw = {'endianess': endianess} if endianess is not None else {}
    w = gguf.GGUFWriter(str(path), arch, **kw)
    w.add_name(f'{arch} vocab')
    w.add_context_length(32768)
    w.add_block_count(24)
    w.add_embedding_length(896)
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('qwen2')
    w.add_token_list([f't{i}' for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    w.add_token_merges([f't{i} t{i + 1}' for i in range(n_vocab - 1)])
    w.add_eos_token_id(2)
    w.add_array('test.nested', [[1, 2], [3, 4, 5]])
    w.add_float64('test.f64', 0.5)
    w.add_bool('test.bool', True)
    w.add_int8('test.i8', -3)
    w.add_uint64('test.u64', 2**40)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def strip_padding(path: Path) -> None:
    """llama.cpp's own files end right after the last key/value: cut what the writer padded after it."""
    raw = path.read_bytes()
    end = read_header_end(path)
    assert set(raw[end:]) <= {0}
    path.write_bytes(raw[:end])


def read_header_end(path: Path) -> int:
    reader = gguf.GGUFReader(str(path))
    last = max(reader.fields.values(), key=lambda f: f.offset)
    return int(last.offset + sum(part.nbytes for part in last.parts))


def _value(field: Any) -> Any:
    """gguf-py's reading of one field, comparable with ours (strings decoded, arrays as lists)."""
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    if vtype == gguf.GGUFValueType.ARRAY:
        items = [field.parts[i] for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(p).decode() for p in items]
        return [v.item() for p in items for v in np.asarray(p).ravel()]
    return np.asarray(field.parts[field.data[0]]).ravel()[0].item()


def _ours(value: Any) -> Any:
    if hasattr(value, 'as_dict'):  # a long array, summarised
        return value.as_dict()
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for sub in value for x in sub]  # gguf-py flattens nested arrays
    return value


@pytest.mark.parametrize('endianess', [None, gguf.GGUFEndian.BIG])
@pytest.mark.parametrize('padded', [True, False])
def test_vocab_only_files_read_like_gguf_py(tmp_path: Path, endianess: Any, padded: bool) -> None:
    path = write_vocab_only(tmp_path / 'ggml-vocab-qwen2.gguf', endianess=endianess)
    if not padded:
        strip_padding(path)
    header = read_header(path)  # once: "truncated: tensor data ends at byte ..."
    assert header.tensors == []
    reader = gguf.GGUFReader(str(path))
    theirs = {name: f for name, f in reader.fields.items() if not name.startswith('GGUF.')}
    assert set(header.kv) == set(theirs)
    for name, field in theirs.items():
        ours = _ours(header.kv[name])
        if isinstance(ours, dict):  # summarised: type and length must agree
            assert ours['length'] == len(field.data), name
        else:
            assert ours == _value(field), name


async def test_a_vocab_only_file_is_listed_as_such_and_never_started(
    system_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / 'models'
    folder.mkdir()
    strip_padding(write_vocab_only(folder / 'ggml-vocab-qwen2.gguf'))
    system = await system_factory(models_dirs=[folder], scan_well_known_dirs=False)
    entry = system.library.get('ggml-vocab-qwen2')
    assert entry is not None and 'vocab-only' in entry.error and 'invalid' not in entry.error
    assert entry.meta.architecture == 'qwen2' and entry.meta.vocab_size == 300
    assert entry.meta.tokenizer_model == 'gpt2' and entry.meta.context_length == 32768
    from core.supervisor.errors import ModelUnusable

    with pytest.raises(ModelUnusable, match='vocab-only'):
        await asyncio.wait_for(system.scheduler.load(entry.id), 10)
