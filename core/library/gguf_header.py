"""Lazy GGUF header reader: key/values and tensor infos, without decoding big arrays.

`gguf.GGUFReader` decodes every array element (seconds on a 150k-token vocabulary). This reader walks the
GGUF v2/v3 layout over an mmap with `struct`, keeps scalars and small arrays, records big arrays by type and
length only, and stops after the tensor infos. Every count and length is checked against the bytes left in the
file before it is used, so a corrupt or hostile file gives `GGUFError`, never a huge allocation or a read past
its end.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

SMALL_ARRAY = 64  # arrays up to this length are decoded; longer ones are summarised
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_LEN = 65_536
GGUF_MAGIC_BYTES = struct.pack('<I', GGUF_MAGIC)  # b'GGUF'

_SCALAR_FMT = {
    GGUFValueType.UINT8: 'B',
    GGUFValueType.INT8: 'b',
    GGUFValueType.UINT16: 'H',
    GGUFValueType.INT16: 'h',
    GGUFValueType.UINT32: 'I',
    GGUFValueType.INT32: 'i',
    GGUFValueType.FLOAT32: 'f',
    GGUFValueType.BOOL: '?',
    GGUFValueType.UINT64: 'Q',
    GGUFValueType.INT64: 'q',
    GGUFValueType.FLOAT64: 'd',
}
_SCALAR_SIZE = {t: struct.calcsize('<' + f) for t, f in _SCALAR_FMT.items()}


class GGUFError(Exception):
    """The file is not a GGUF file this reader can use; the message says why."""


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """A big array, summarised: element type name and length."""

    item_type: str
    length: int

    def as_dict(self) -> dict[str, Any]:
        return {'array': self.item_type, 'length': self.length}


class TensorInfo(NamedTuple):  # a tuple: a header has hundreds and creating them is most of the tensor loop
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    ggml_type: int
    offset: int  # relative to the start of the tensor data
    n_elements: int
    n_bytes: int | None  # None for a type this gguf version does not know

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f'TYPE_{self.ggml_type}'


@dataclass(slots=True)
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    kv: dict[str, Any] = field(default_factory=dict)  # small values decoded; big arrays as ArrayInfo
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0  # absolute offset of the tensor data


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic (for `.bin` files). Never blocks on FIFOs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 4) == GGUF_MAGIC_BYTES
    except OSError:
        return False
    finally:
        os.close(fd)


def read_header(path: Path) -> GGUFHeader:
    """Read the header of one GGUF file. Raises `GGUFError` (or `OSError` when it cannot be opened)."""
    # O_NONBLOCK: opening a FIFO named *.gguf must not hang the scan; fstat then rejects it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError('not a regular file')
        if st.st_size < 24:
            raise GGUFError(f'too short for a GGUF header ({st.st_size} bytes)')
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            return _Parser(mm, Path(path), st.st_size).parse()
    finally:
        os.close(fd)


def read_header_prefix(data: bytes, file_size: int, name: str = '<remote>') -> GGUFHeader:
    """The header of a `file_size`-byte GGUF file from its first bytes only (a range request). Raises `GGUFError`;
    one that says `truncated` means the header goes on past `data`: fetch more."""
    if len(data) < 24:
        raise GGUFError(f'truncated: {len(data)} bytes are too few for a GGUF header')
    return _Parser(data, Path(name), len(data), total=file_size).parse()


class _Parser:
    def __init__(self, buf: mmap.mmap | bytes, path: Path, size: int, total: int | None = None) -> None:
        self.buf = buf
        self.path = path
        self.size = size  # bytes readable in `buf`
        self.total = size if total is None else total  # the whole file's size (more than `size` for a prefix)
        self.pos = 0
        self.bo = '<'

    # ---- primitives ----------------------------------------------------------------------------------------
    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f'truncated: {what} needs {n} bytes at offset {self.pos}, file has {self.size}')

    def _unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        value = struct.unpack_from(self.bo + fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def _count(self, what: str, min_item: int) -> int:
        """A u64 count, rejected when that many items of at least `min_item` bytes cannot fit in the rest."""
        n = self._unpack('Q', what)
        if n * min_item > self.total - self.pos:
            raise GGUFError(f'{what} {n} is impossible: only {self.total - self.pos} bytes left (truncated or corrupt)')
        return n

    def _string(self, what: str) -> str:
        n = self._unpack('Q', f'{what} length')
        self._need(n, f'{what} ({n} bytes)')
        s = bytes(self.buf[self.pos : self.pos + n]).decode('utf-8', errors='replace')
        self.pos += n
        return s

    # ---- layout --------------------------------------------------------------------------------------------
    def parse(self) -> GGUFHeader:
        magic = bytes(self.buf[0:4])
        if magic != GGUF_MAGIC_BYTES:
            raise GGUFError(f'bad magic {magic!r} (expected {GGUF_MAGIC_BYTES!r})')
        self.pos = 4
        version = self._unpack('I', 'version')
        swapped = int.from_bytes(version.to_bytes(4, 'little'), 'big')
        if version not in (1, 2, 3) and swapped in (2, 3):  # written big-endian (GGUF allows it)
            self.bo, version = '>', swapped
        if version not in (2, 3):
            raise GGUFError(f'unsupported GGUF version {version} (supported: 2, 3)')
        n_tensors = self._count('tensor count', 8 + 4 + 4 + 8)
        n_kv = self._count('key/value count', 8 + 4 + 1)
        header = GGUFHeader(self.path, version, self.total)
        for _ in range(n_kv):
            key = self._key()
            vtype = self._vtype(key)
            header.kv[key] = self._value(vtype, key)
        header.tensors = self._tensor_infos(n_tensors)
        align = header.kv.get('general.alignment', GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f'general.alignment {align!r} is not a power of two')
        header.data_offset = -(-self.pos // align) * align
        # No tensors, no data section: llama.cpp's vocab-only files end right after their key/values, unpadded.
        data_end = header.data_offset + max((t.offset + (t.n_bytes or 0) for t in header.tensors), default=0)
        if not header.tensors:
            header.data_offset = data_end = min(header.data_offset, self.total)
        if data_end > self.total:
            raise GGUFError(f'truncated: tensor data ends at byte {data_end}, the file has {self.total}')
        return header

    def _key(self) -> str:
        n = self._unpack('Q', 'key length')
        if n > MAX_KEY_LEN:
            raise GGUFError(f'key length {n} at offset {self.pos - 8} is absurd')
        self._need(n, 'key')
        key = bytes(self.buf[self.pos : self.pos + n]).decode('utf-8', errors='replace')
        self.pos += n
        return key

    def _vtype(self, key: str) -> GGUFValueType:
        raw = self._unpack('I', f'type of {key}')
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(f'unknown value type {raw} for {key}') from None

    def _value(self, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._string(key)
        if vtype == GGUFValueType.ARRAY:
            return self._array(key, depth=0)
        return self._unpack(_SCALAR_FMT[vtype], key)

    def _array(self, key: str, depth: int) -> Any:
        if depth > 2:
            raise GGUFError(f'{key}: arrays nested too deep')
        itype = self._vtype(key)
        min_item = _SCALAR_SIZE.get(itype, 8 if itype == GGUFValueType.STRING else 12)
        n = self._count(f'{key} length', min_item)
        if n <= SMALL_ARRAY:
            if itype == GGUFValueType.ARRAY:
                return [self._array(key, depth + 1) for _ in range(n)]
            return [self._value(itype, key) for _ in range(n)]
        if itype in _SCALAR_SIZE:
            self._need(n * min_item, key)
            self.pos += n * min_item
        elif itype == GGUFValueType.STRING:
            self._skip_strings(n, key)
        else:
            for _ in range(n):
                self._array(key, depth + 1)
        return ArrayInfo(itype.name, n)

    def _skip_strings(self, n: int, key: str) -> None:
        if self.bo == '<':
            self.pos = skip_strings(self.buf, self.pos, n, self.size, key)
        else:
            self.pos = _walk_strings(self.buf, self.pos, n, self.size, key, '>')

    def _tensor_infos(self, n: int) -> list[TensorInfo]:
        """The tensor infos: one tight loop, since a model has hundreds (this is most of a header's time)."""
        buf, size, pos, bo = self.buf, self.size, self.pos, self.bo
        u64 = struct.Struct(bo + 'Q').unpack_from
        u32 = struct.Struct(bo + 'I').unpack_from
        type_offset = struct.Struct(bo + 'IQ').unpack_from
        dims = {k: struct.Struct(f'{bo}{k}Q').unpack_from for k in range(1, MAX_DIMS + 1)}
        out = []
        for i in range(n):
            if pos + 8 > size:
                raise GGUFError(f'truncated: tensor {i} info at offset {pos}')
            name_len = u64(buf, pos)[0]
            pos += 8
            if name_len > MAX_KEY_LEN or pos + name_len + 4 > size:
                raise GGUFError(f'truncated or corrupt: tensor {i} name of {name_len} bytes at offset {pos}')
            name = buf[pos : pos + name_len].decode('utf-8', errors='replace')
            pos += name_len
            n_dims = u32(buf, pos)[0]
            pos += 4
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f'tensor {name}: {n_dims} dimensions (1..{MAX_DIMS} allowed)')
            if pos + 8 * n_dims + 12 > size:
                raise GGUFError(f'truncated: tensor {name} info at offset {pos}')
            shape = dims[n_dims](buf, pos)
            pos += 8 * n_dims
            ggml_type, offset = type_offset(buf, pos)
            pos += 12
            n_elements = math.prod(shape)
            if n_elements >= 1 << 62:
                raise GGUFError(f'tensor {name}: shape {shape} is absurd')
            q = _QUANT_SIZES.get(ggml_type)
            n_bytes = None if q is None else n_elements // q[0] * q[1]
            out.append(TensorInfo(name, shape, ggml_type, offset, n_elements, n_bytes))
        self.pos = pos
        return out


_QUANT_SIZES = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
MAX_FAST_ROUNDS = 32


def _walk_strings(buf: Any, pos: int, n: int, size: int, key: str, bo: str = '<') -> int:
    """End of `n` length-prefixed strings at `pos`, one by one (about 0.15 us a string)."""
    q = struct.Struct(bo + 'Q').unpack_from
    for i in range(n):
        if pos + 8 > size:
            raise GGUFError(f'truncated: {key}[{i}] at offset {pos}')
        pos += 8 + q(buf, pos)[0]
        if pos > size:
            raise GGUFError(f'truncated: {key}[{i}] ends past the end of the file')
    return pos


def skip_strings(buf: Any, pos: int, n: int, size: int, key: str = 'array') -> int:
    """End of `n` little-endian length-prefixed strings at `pos`, mostly with numpy; exact, or GGUFError.

    A Python walk over a 150k-token vocabulary costs ~25 ms. `_verified_run` finds the strings that numpy
    can prove; a string it cannot (long, empty or holding a NUL byte) is stepped over in Python, and the
    numpy pass resumes after it. Too many such strings and the rest is walked in Python.
    """
    for _ in range(MAX_FAST_ROUNDS):
        if n == 0:
            return pos
        window = min(size - pos, n * 16 + 64)  # vocabularies average well under 8 bytes of text a token
        done, end = _verified_run(buf, pos, n, window)
        if done:
            pos, n = end, n - done
            continue
        pos, n = _walk_strings(buf, pos, 1, size, key), n - 1
    return _walk_strings(buf, pos, n, size, key)


def _verified_run(buf: Any, pos: int, n: int, window: int) -> tuple[int, int]:
    """(k, end): the first k (<= n) strings at `pos` provably end at `end`; (0, pos) when none can be proven.

    A string shorter than 256 bytes has a length prefix of one non-zero byte and 7 zero bytes; when the text
    holds no NUL byte those 7 zeros are the only zero run, and every run of 7 zeros covers exactly one aligned
    zero u32. So one u32 compare over the window finds a zero word per string; the zero high bytes of the word
    before it say where the run starts, and its next byte up is the length. Candidates count only as far as
    they chain exactly (next = start + 8 + length), which proves them.
    """
    base = pos & ~3
    count = (pos - base + window) // 4
    if count < 2:
        return 0, pos
    words = np.frombuffer(buf, '<u4', count=count, offset=base)
    j = np.flatnonzero(words[1:-1] == 0)  # zero words between two others: word j + 1 is zero, word j precedes it
    prev = words[j]
    t = (prev < 0x1000000).astype(np.uint32)  # zero bytes at the top of the previous word
    t += prev < 0x10000
    t += prev < 0x100
    # The run's last 3 - t zeros are the low bytes of word j + 2; unchecked, a corrupt length such as
    # 0x7f00000000000005 would pass for a 5-byte string.
    keep = (words[j + 2] & (0xFFFFFF >> (t * 8))) == 0
    j, prev, t = j[keep], prev[keep], t[keep]
    cand = j * 4
    cand += 3
    cand -= t  # offset from base of the length byte
    lengths = (prev >> ((3 - t) * 8)) & 0xFF
    first = int(np.searchsorted(cand, pos - base))
    if first == len(cand) or cand[first] != pos - base:
        return 0, pos
    m = min(len(cand) - first, n)
    cand = cand[first : first + m]
    nxt = cand + 8
    nxt += lengths[first : first + m]
    neq = cand[1:] != nxt[:-1]
    i = int(neq.argmax()) if m > 1 else 0
    k = i + 1 if m > 1 and neq[i] else m
    end = base + int(nxt[k - 1])
    if end > pos + window:  # the last string's text runs past the window: leave it to the next round
        k -= 1
        end = base + int(cand[k]) if k else pos
    return k, end
