"""JSON on the data path: orjson (several times faster than the stdlib on request-sized bodies), falling back to
the stdlib for what orjson refuses but clients may still send: integers beyond 64 bits, NaN / Infinity literals."""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_DEPTH = 1024  # orjson's own limit


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)  # raises ValueError like orjson's error does (JSONDecodeError is one)
    except RecursionError:  # orjson stops at 1024 levels; the stdlib would overflow the stack
        raise ValueError(f'nested more than {MAX_DEPTH} levels deep') from None


def dumps(obj: Any) -> bytes:
    """Raises `TooDeep` (a ValueError) for what no encoder here can write: orjson stops at 255 levels."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        pass
    try:
        return json.dumps(obj).encode()
    except RecursionError:
        raise TooDeep('JSON nested too deeply to forward (at most 255 levels)') from None


class TooDeep(ValueError):
    pass
