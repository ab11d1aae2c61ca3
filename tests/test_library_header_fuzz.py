"""Property-based fuzzing of the lazy GGUF header reader (Hypothesis).

Random, truncated and mutated files give a header or a `GGUFError`: never another exception, never a call that
runs on, never an allocation out of proportion to the file. Valid files, written by `gguf.GGUFWriter` in either
byte order, read the same key/values and tensor infos as `gguf.GGUFReader`.
"""

from __future__ import annotations

import math
import re
import signal
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from hypothesis import given, settings
from hypothesis import strategies as st

from core.library.gguf_header import SMALL_ARRAY, ArrayInfo, GGUFError, GGUFHeader, is_gguf, read_header

FUZZ = settings(max_examples=200, deadline=2000)
HANG_S = 5  # a call still running after this is a hang, whatever the deadline says afterwards
# Big arrays are only counted; the worst honest case is a small INT8 array, each 1-byte value a 28-byte int and an
# 8-byte list slot (36x). A few KiB go to the parser itself.
MEMORY_PER_BYTE = 64
MEMORY_SLACK = 64 * 1024

ENDIANS = {'<': gguf.GGUFEndian.LITTLE, '>': gguf.GGUFEndian.BIG}
TEXT = st.text(alphabet='ab z.\0éß✓€𝄞', max_size=12)  # 1- to 4-byte UTF-8 and NUL
ITEM_MIN = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
ITEM_MIN |= {VT.STRING: 8, VT.ARRAY: 12}  # a string is at least its u64 length; an array its type and count
TENSOR_INFO_MIN = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
KV_MIN = 8 + 4 + 1  # key length, value type, a one-byte value


class _Hang(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _Hang(f'read_header still running after {seconds} s')

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _read(path: Path) -> GGUFHeader | GGUFError:
    """read_header, bounded in time and memory: its header or its GGUFError; any other exception propagates."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with _time_limit(HANG_S):
            try:
                result: GGUFHeader | GGUFError = read_header(path)
            except GGUFError as e:
                result = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_PER_BYTE * size + MEMORY_SLACK, f'{peak} bytes allocated to read a {size}-byte file'
    return result


def _assert_sane(h: GGUFHeader, size: int) -> None:
    """What a caller relies on when read_header returns: the tensor data it describes lies inside the file."""
    assert h.version in (2, 3) and h.file_size == size
    assert h.data_offset <= size
    for t in h.tensors:
        assert 1 <= len(t.shape) <= 4 and t.n_elements == math.prod(t.shape)
        assert h.data_offset + t.offset + (t.n_bytes or 0) <= size, t


def _write(
    path: Path,
    kv: dict[str, tuple[Any, VT, VT | None]],
    tensors: dict[str, tuple[np.ndarray, QT]] | None = None,
    endian: str = '<',
    alignment: int | None = None,
) -> Path:
    w = gguf.GGUFWriter(path, 'fuzz', endianess=ENDIANS[endian])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub_type) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, (data, qtype) in (tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _summarised(value: Any) -> Any:
    """A written value as read_header gives it back: arrays longer than SMALL_ARRAY as ArrayInfo."""
    if not isinstance(value, list):
        return value
    if len(value) > SMALL_ARRAY:
        return ArrayInfo(VT.get_type(value[0]).name, len(value))
    return [_summarised(v) for v in value]


def _depth(value: Any) -> int:
    return 1 + max(map(_depth, value)) if isinstance(value, list) else 0


def _expected_kv(reader: gguf.GGUFReader, written: dict[str, tuple[Any, VT, VT | None]]) -> dict[str, Any]:
    """read_header's kv as GGUFReader sees the file; nested arrays (GGUFReader flattens them) as written."""
    out: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith('GGUF.'):
            continue
        if f.types[0] != VT.ARRAY:
            out[name] = f.contents()
            continue
        itype, n = VT(int(f.parts[3][0])), int(f.parts[4][0])
        if n > SMALL_ARRAY:
            out[name] = ArrayInfo(itype.name, n)
        elif itype == VT.ARRAY:
            out[name] = _summarised(written[name][0])
        else:
            out[name] = f.contents()
    return out


def _assert_reads_like_gguf_reader(path: Path, written: dict[str, tuple[Any, VT, VT | None]]) -> GGUFHeader:
    h = _read(path)
    assert isinstance(h, GGUFHeader), h
    ref = gguf.GGUFReader(path)
    assert h.kv == _expected_kv(ref, written)
    assert h.data_offset == ref.data_offset
    assert [t.name for t in h.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(h.tensors, ref.tensors, strict=True):
        assert mine.shape == tuple(int(x) for x in theirs.shape)
        assert mine.ggml_type == theirs.tensor_type and mine.n_bytes == theirs.n_bytes
        assert h.data_offset + mine.offset == theirs.data_offset
    _assert_sane(h, path.stat().st_size)
    return h


# ---- the base file that the truncation and mutation tests start from ------------------------------------------

TOKENS = [f'w{i}' * (1 + i % 4) for i in range(300)]  # 2..16 bytes: every alignment of the length prefixes
TOKENS[7], TOKENS[11], TOKENS[13], TOKENS[17] = 'x' * 300, 'a\0b', 'é✓𝄞', ''  # what the numpy skip cannot prove
BASE_KV: dict[str, tuple[Any, VT, VT | None]] = {
    'general.name': ('fuzz base', VT.STRING, None),
    'test.u8': (200, VT.UINT8, None),
    'test.i8': (-100, VT.INT8, None),
    'test.u16': (60_000, VT.UINT16, None),
    'test.i16': (-30_000, VT.INT16, None),
    'test.u32': (4_000_000_000, VT.UINT32, None),
    'test.i32': (-2_000_000_000, VT.INT32, None),
    'test.u64': (2**64 - 1, VT.UINT64, None),
    'test.i64': (-(2**63), VT.INT64, None),
    'test.f32': (0.5, VT.FLOAT32, None),
    'test.f64': (-1e300, VT.FLOAT64, None),
    'test.bool': (True, VT.BOOL, None),
    'test.empty': ('', VT.STRING, None),
    'tokenizer.ggml.tokens': (TOKENS, VT.ARRAY, VT.STRING),
    'tokenizer.ggml.scores': ([-float(i) for i in range(300)], VT.ARRAY, VT.FLOAT32),
    'tokenizer.ggml.token_type': ([1] * 300, VT.ARRAY, VT.INT32),
    'test.small_u16': (list(range(10)), VT.ARRAY, VT.UINT16),
    'test.small_strings': (['a', 'bc', ''], VT.ARRAY, VT.STRING),
    'test.nested': ([[1, 2, 3], ['x', 'yz'], [[0.5]]], VT.ARRAY, VT.ARRAY),
    'test.nested_big': ([[i, -i] for i in range(70)], VT.ARRAY, VT.ARRAY),
    'test.after': ('still here', VT.STRING, None),
}
BASE_TENSORS: dict[str, tuple[np.ndarray, QT]] = {
    'a.weight': (np.arange(8, dtype=np.float32), QT.F32),
    'b.weight': (np.ones((4, 8), dtype=np.float16), QT.F16),
    'c.weight': (gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), QT.Q8_0), QT.Q8_0),
    'd.weight': (np.zeros((2, 2, 2, 2), dtype=np.float32), QT.F32),
}


class Field(NamedTuple):
    offset: int
    width: int  # 8 for counts and lengths, 4 for value types and dimension counts
    what: str
    limit: int  # the largest value this file could hold: anything above it must be refused


class Base(NamedTuple):
    raw: bytes
    order: Literal['little', 'big']
    fields: list[Field]
    starts: list[int]  # where each part of the header starts (and the bytes either side), before data_end
    data_offset: int
    data_end: int  # where the last tensor's data ends: any shorter file is truncated

    def __repr__(self) -> str:  # Hypothesis prints the arguments of a failing example
        return f'Base({self.order}-endian, {len(self.raw)} bytes, {len(self.fields)} fields)'


def _layout(path: Path, endian: str) -> Base:
    """Every count, length, type and dimension of a valid file, located by GGUFReader's parts."""
    reader = gguf.GGUFReader(path)
    raw = path.read_bytes()
    size = len(raw)
    origin = reader.data.ctypes.data
    fields: list[Field] = []
    starts: set[int] = set()

    def at(part: np.ndarray) -> int:
        return part.ctypes.data - origin

    def u64(part: np.ndarray, what: str, item: int = 1) -> None:
        fields.append(Field(at(part), 8, what, (size - at(part) - 8) // item))

    def u32(part: np.ndarray, what: str, limit: int) -> None:
        fields.append(Field(at(part), 4, what, limit))

    def value(parts: Iterator[np.ndarray], vtype: VT, key: str) -> None:
        if vtype == VT.STRING:
            u64(next(parts), f'{key} string length')
            next(parts)
        elif vtype == VT.ARRAY:
            itype_part, n_part = next(parts), next(parts)
            itype = VT(int(itype_part[0]))
            u32(itype_part, f'{key} item type', max(VT))
            u64(n_part, f'{key} array length', ITEM_MIN[itype])
            for _ in range(int(n_part[0])):
                value(parts, itype, key)
        else:
            next(parts)

    u64(reader.fields['GGUF.tensor_count'].parts[0], 'tensor count', TENSOR_INFO_MIN)
    u64(reader.fields['GGUF.kv_count'].parts[0], 'key/value count', KV_MIN)
    for key, f in reader.fields.items():
        starts.update(at(p) for p in f.parts)
        if key.startswith('GGUF.'):
            continue
        u64(f.parts[0], f'{key} key length')
        u32(f.parts[2], f'{key} value type', max(VT))
        value(iter(f.parts[3:]), f.types[0], key)
    for t in reader.tensors:
        name_len, _name, n_dims, dims, _type, offset = t.field.parts
        starts.update(at(p) for p in t.field.parts)
        starts.add(t.data_offset)
        u64(name_len, f'{t.name} name length')
        u32(n_dims, f'{t.name} dimension count', 4)
        # every type here takes at least a byte an element: a dimension longer than the file cannot fit
        fields += [Field(at(dims) + 8 * k, 8, f'{t.name} dimension {k}', size) for k in range(len(dims))]
        fields.append(Field(at(offset), 8, f'{t.name} data offset', size - reader.data_offset - t.n_bytes))
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    near = sorted({s + d for s in starts for d in (-1, 0, 1) if 0 <= s + d < data_end})
    order: Literal['little', 'big'] = 'little' if endian == '<' else 'big'
    return Base(raw, order, fields, near, reader.data_offset, data_end)


@pytest.fixture(scope='module')
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('fuzz')


@pytest.fixture(scope='module')
def bases(work: Path) -> dict[str, Base]:
    names = {'<': 'base-le.gguf', '>': 'base-be.gguf'}
    return {e: _layout(_write(work / names[e], BASE_KV, BASE_TENSORS, e, alignment=64), e) for e in ENDIANS}


def _mutated(work: Path, base: Base, edits: list[tuple[int, bytes]]) -> Path:
    raw = bytearray(base.raw)
    for offset, data in edits:
        raw[offset : offset + len(data)] = data
    path = work / 'case.gguf'
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize('endian', list(ENDIANS))
def test_base_file_reads_like_gguf_reader(work: Path, bases: dict[str, Base], endian: str):
    path = work / 'case.gguf'
    path.write_bytes(bases[endian].raw)
    h = _assert_reads_like_gguf_reader(path, BASE_KV)
    assert h.kv['tokenizer.ggml.tokens'] == ArrayInfo('STRING', 300)
    assert h.kv['test.nested'] == [[1, 2, 3], ['x', 'yz'], [[0.5]]]
    assert h.kv['test.nested_big'] == ArrayInfo('ARRAY', 70)
    assert h.kv['test.after'] == 'still here'
    assert len(bases[endian].fields) > 300  # the field map found every vocabulary string


# ---- random bytes ----------------------------------------------------------------------------------------------


def _chunk(bo: str) -> st.SearchStrategy[bytes]:
    """Pieces that look like GGUF: small counts and lengths, value types, strings, huge values, noise."""

    def u64(n: int) -> bytes:
        return struct.pack(bo + 'Q', n)

    return st.one_of(
        st.integers(0, SMALL_ARRAY + 8).map(u64),
        st.integers(0, max(VT) + 1).map(lambda t: struct.pack(bo + 'I', t)),  # a value type, or one past the last
        TEXT.map(str.encode).map(lambda b: u64(len(b)) + b),
        st.sampled_from([2**64 - 1, 2**63, 2**62, 2**32, 65_537]).map(u64),
        st.binary(max_size=16),
    )


@st.composite
def gguf_like(draw: st.DrawFn) -> bytes:
    """A GGUF head (magic, version, a few tensors and key/values) and then pieces."""
    bo = draw(st.sampled_from(list(ENDIANS)))
    head = struct.pack(bo + 'IQQ', draw(st.sampled_from([2, 3])), draw(st.integers(0, 2)), draw(st.integers(0, 6)))
    return b'GGUF' + head + b''.join(draw(st.lists(_chunk(bo), max_size=60)))


NOISE = st.tuples(st.sampled_from([b'', b'GGUF', b'GGUF\x03\0\0\0', b'GGUF\0\0\0\x02']), st.binary(max_size=300))


@FUZZ
@given(raw=st.one_of(gguf_like(), NOISE.map(b''.join)))
def test_random_bytes_give_a_header_or_gguf_error(work: Path, raw: bytes):
    path = work / 'case.gguf'
    path.write_bytes(raw)
    result = _read(path)
    assert is_gguf(path) == raw.startswith(b'GGUF')
    if isinstance(result, GGUFHeader):
        _assert_sane(result, len(raw))


# ---- valid files, truncated ------------------------------------------------------------------------------------


@FUZZ
@given(endian=st.sampled_from(list(ENDIANS)), data=st.data())
def test_a_truncated_file_is_refused_as_truncated(work: Path, bases: dict[str, Base], endian: str, data: st.DataObject):
    base = bases[endian]
    cut = data.draw(st.one_of(st.integers(0, base.data_end - 1), st.sampled_from(base.starts)), label='cut')
    path = work / 'case.gguf'
    path.write_bytes(base.raw[:cut])
    result = _read(path)
    assert isinstance(result, GGUFError), f'a file cut at byte {cut} of {base.data_end} was accepted'
    assert re.search('truncated|too short', str(result)), result


# ---- valid files, mutated --------------------------------------------------------------------------------------


def _with_byte(value: int, index: int, byte: int) -> int:
    return value & ~(0xFF << 8 * index) | byte << 8 * index


@FUZZ
@given(endian=st.sampled_from(list(ENDIANS)), data=st.data())
def test_an_impossible_count_or_length_is_refused(work: Path, bases: dict[str, Base], endian: str, data: st.DataObject):
    """Set one count, length, type or dimension to anything: past what the file can hold it must be refused."""
    base = bases[endian]
    field = data.draw(st.sampled_from(base.fields), label='field')
    old = int.from_bytes(base.raw[field.offset : field.offset + field.width], base.order)
    top = 2 ** (8 * field.width) - 1
    value = data.draw(
        st.one_of(
            st.sampled_from([top, 2 ** (8 * field.width - 1), field.limit + 1, 0]),
            st.integers(0, 8 * field.width - 1).map(lambda k: old ^ 1 << k),
            st.tuples(st.integers(0, field.width - 1), st.integers(1, 255)).map(lambda ib: _with_byte(old, *ib)),
            st.integers(-3, 3).map(lambda d: min(max(old + d, 0), top)),
            st.integers(0, top),
        ),
        label='value',
    )
    path = _mutated(work, base, [(field.offset, value.to_bytes(field.width, base.order))])
    result = _read(path)
    if value > field.limit:
        assert isinstance(result, GGUFError), f'{field.what} = {value:#x} (at most {field.limit}) was accepted'
    elif isinstance(result, GGUFHeader):
        _assert_sane(result, len(base.raw))


@FUZZ
@given(endian=st.sampled_from(list(ENDIANS)), data=st.data())
def test_random_mutations_give_a_header_or_gguf_error(
    work: Path, bases: dict[str, Base], endian: str, data: st.DataObject
):
    """Overwrite 1, 4 or 8 bytes anywhere in the header, a few times."""
    base = bases[endian]
    edit = st.tuples(
        st.integers(0, base.data_offset - 1),
        st.sampled_from([1, 4, 8]).flatmap(
            lambda w: st.one_of(st.binary(min_size=w, max_size=w), st.sampled_from([b'\xff' * w, b'\0' * w]))
        ),
    )
    path = _mutated(work, base, data.draw(st.lists(edit, min_size=1, max_size=4), label='edits'))
    result = _read(path)
    if isinstance(result, GGUFHeader):
        _assert_sane(result, len(base.raw))


def test_a_vocab_string_length_with_junk_in_its_high_bytes_is_refused(work: Path, bases: dict[str, Base]):
    """The numpy skip over a big string array proves short strings from their length bytes; a length such as
    0x7f00000000000005 must not pass for a 5-byte string, whatever the alignment of its prefix."""
    base = bases['<']
    lengths = [f for f in base.fields if f.what == 'tokenizer.ggml.tokens string length'][20:36]
    assert {f.offset % 4 for f in lengths} == {0, 1, 2, 3}
    for f in lengths:
        for byte in range(1, 8):
            result = _read(_mutated(work, base, [(f.offset + byte, b'\x7f')]))
            assert isinstance(result, GGUFError), f'string length at {f.offset} with byte {byte} set was accepted'


# ---- valid files, generated --------------------------------------------------------------------------------------

KEYS = st.text(alphabet='abcdefghijklmnopqrstuvwxyz_.0123456789é', min_size=1, max_size=24).filter(
    lambda k: not k.startswith('general.')
)
_INT_RANGES = {
    VT.UINT8: (0, 2**8 - 1),
    VT.INT8: (-(2**7), 2**7 - 1),
    VT.UINT16: (0, 2**16 - 1),
    VT.INT16: (-(2**15), 2**15 - 1),
    VT.UINT32: (0, 2**32 - 1),
    VT.INT32: (-(2**31), 2**31 - 1),
    VT.UINT64: (0, 2**64 - 1),
    VT.INT64: (-(2**63), 2**63 - 1),
}
VALUES: dict[VT, st.SearchStrategy[Any]] = {t: st.integers(lo, hi) for t, (lo, hi) in _INT_RANGES.items()}
VALUES |= {
    VT.FLOAT32: st.floats(width=32, allow_nan=False),
    VT.FLOAT64: st.floats(allow_nan=False),
    VT.BOOL: st.booleans(),
    VT.STRING: TEXT,
}
# Items of a nested array are typed by GGUFWriter from the Python value: int32, float32, bool, string.
LEAF_ITEMS = st.sampled_from([VT.INT32, VT.FLOAT32, VT.BOOL, VT.STRING])


def _some(items: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A short list, or one just longer than SMALL_ARRAY (which read_header summarises)."""
    return st.one_of(
        st.lists(items, min_size=1, max_size=4), st.lists(items, min_size=SMALL_ARRAY + 1, max_size=SMALL_ARRAY + 3)
    )


@st.composite
def nested(draw: st.DrawFn, depth: int) -> list[Any]:
    """A list nested exactly `depth` deep; siblings of the first item may be shallower."""
    if depth == 1:
        return draw(LEAF_ITEMS.flatmap(lambda t: _some(VALUES[t])))
    first = draw(nested(depth - 1))
    rest = draw(st.lists(st.integers(1, depth - 1).flatmap(nested), max_size=1 if depth > 2 else 2))
    return [first, *rest]


SCALAR_KV = st.sampled_from(list(VALUES)).flatmap(lambda t: VALUES[t].map(lambda v: (v, t, None)))
ARRAY_KV = st.sampled_from(list(VALUES)).flatmap(lambda t: _some(VALUES[t]).map(lambda v: (v, VT.ARRAY, t)))
NESTED_KV = st.integers(2, 3).flatmap(nested).map(lambda v: (v, VT.ARRAY, VT.ARRAY))
TENSOR = st.tuples(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.sampled_from([(np.float32, QT.F32), (np.float16, QT.F16)]),
).map(lambda s: (np.ones(s[0], dtype=s[1][0]), s[1][1]))


@FUZZ
@given(
    kv=st.dictionaries(KEYS, st.one_of(SCALAR_KV, ARRAY_KV, NESTED_KV), max_size=6),
    tensors=st.dictionaries(KEYS, TENSOR, max_size=3),
    endian=st.sampled_from(list(ENDIANS)),
    alignment=st.sampled_from([None, 1, 8, 256]),
)
def test_valid_files_read_like_gguf_reader(
    work: Path,
    kv: dict[str, tuple[Any, VT, VT | None]],
    tensors: dict[str, tuple[np.ndarray, QT]],
    endian: str,
    alignment: int | None,
):
    path = _write(work / 'case.gguf', kv, tensors, endian, alignment)
    _assert_reads_like_gguf_reader(path, kv)


@FUZZ
@given(value=st.integers(1, 6).flatmap(nested), endian=st.sampled_from(list(ENDIANS)))
def test_nested_arrays_read_as_written_up_to_three_deep(work: Path, value: list[Any], endian: str):
    kv: dict[str, tuple[Any, VT, VT | None]] = {
        'test.nested': (value, VT.ARRAY, None),
        'test.after': ('end', VT.STRING, None),
    }
    path = _write(work / 'case.gguf', kv, endian=endian)
    result = _read(path)
    if _depth(value) > 3:
        assert isinstance(result, GGUFError) and 'nested too deep' in str(result), result
    else:
        assert isinstance(result, GGUFHeader), result
        assert result.kv['test.nested'] == _summarised(value) and result.kv['test.after'] == 'end'
