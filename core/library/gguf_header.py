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
from typing import Any

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


@dataclass(frozen=True, slots=True)
class TensorInfo:
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


class _Parser:
    def __init__(self, buf: mmap.mmap, path: Path, size: int) -> None:
        self.buf = buf
        self.path = path
        self.size = size
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
        if n * min_item > self.size - self.pos:
            raise GGUFError(f'{what} {n} is impossible: only {self.size - self.pos} bytes left (truncated or corrupt)')
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
        header = GGUFHeader(self.path, version, self.size)
        for _ in range(n_kv):
            key = self._key()
            vtype = self._vtype(key)
            header.kv[key] = self._value(vtype, key)
        for i in range(n_tensors):
            header.tensors.append(self._tensor_info(i))
        align = header.kv.get('general.alignment', GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f'general.alignment {align!r} is not a power of two')
        header.data_offset = -(-self.pos // align) * align
        data_end = header.data_offset + max((t.offset + (t.n_bytes or 0) for t in header.tensors), default=0)
        if data_end > self.size:
            raise GGUFError(f'truncated: tensor data ends at byte {data_end}, the file has {self.size}')
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
        end = _skip_short_strings(self.buf, self.pos, n, self.size) if self.bo == '<' else None
        if end is not None:
            self.pos = end
            return
        q = struct.Struct(self.bo + 'Q').unpack_from
        pos, size = self.pos, self.size
        for i in range(n):
            if pos + 8 > size:
                raise GGUFError(f'truncated: {key}[{i}] at offset {pos}')
            pos += 8 + q(self.buf, pos)[0]
        if pos > size:
            raise GGUFError(f'truncated: {key}[{n - 1}] ends past the end of the file')
        self.pos = pos

    def _tensor_info(self, i: int) -> TensorInfo:
        name = self._string(f'tensor {i} name')
        n_dims = self._unpack('I', f'tensor {name} dims')
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f'tensor {name}: {n_dims} dimensions (1..{MAX_DIMS} allowed)')
        self._need(8 * n_dims + 12, f'tensor {name} info')
        shape = struct.unpack_from(f'{self.bo}{n_dims}Q', self.buf, self.pos)
        self.pos += 8 * n_dims
        ggml_type, offset = struct.unpack_from(self.bo + 'IQ', self.buf, self.pos)
        self.pos += 12
        n_elements = math.prod(shape)
        if n_elements >= 1 << 62:
            raise GGUFError(f'tensor {name}: shape {shape} is absurd')
        n_bytes = None
        if ggml_type in _QUANT_SIZES:
            block, type_size = _QUANT_SIZES[ggml_type]
            n_bytes = n_elements // block * type_size
        return TensorInfo(name, tuple(shape), ggml_type, offset, n_elements, n_bytes)


_QUANT_SIZES = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
_BYTE_LIMIT = np.uint64(256)


def _skip_short_strings(buf: mmap.mmap, start: int, n: int, size: int) -> int | None:
    """End offset of an array of `n` little-endian length-prefixed strings, found with numpy; None = unsure.

    A Python loop over a 150k-token vocabulary costs ~25 ms. Instead: while every string is shorter than 256
    bytes and holds no NUL byte, a length prefix is exactly a position whose unaligned u64 is below 256 (its
    7 high bytes are zero, and no other 8-byte window is). Those positions are found with 8 strided views, and
    the guess is only accepted if they form the exact chain `next = pos + 8 + length` from the array start;
    anything else (long or empty strings, NULs) returns None and the caller walks the array item by item.
    """
    window = min(size - start, n * 24 + 64)  # most vocabularies average well under 16 bytes a token
    while True:
        end = _chain_end(buf, start, n, window)
        if end is not None or window >= size - start:
            return end
        window = min(size - start, window * 4)


def _chain_end(buf: mmap.mmap, start: int, n: int, window: int) -> int | None:
    if window < 8 * n:
        return None
    parts = []
    for k in range(8):
        count = (window - k) // 8
        words = np.frombuffer(buf, '<u8', count=count, offset=start + k)
        idx = np.flatnonzero(words < _BYTE_LIMIT)
        idx *= 8
        idx += k
        parts.append(idx)
    cand = np.concatenate(parts)
    if len(cand) < n:
        return None
    cand.sort(kind='stable')  # 8 sorted runs: timsort merges them in linear time
    cand = cand[:n]
    lengths = np.frombuffer(buf, np.uint8, count=window, offset=start)[cand]
    nxt = cand + 8
    nxt += lengths
    if cand[0] != 0 or not np.array_equal(cand[1:], nxt[:-1]):
        return None
    end = start + int(nxt[-1])
    return end if end <= start + window else None
