"""The tiny GGUF generator for tests and benchmarks. It lives in core (`core/library/tiny_gguf.py`), since the app's
first-run demo model is made with it; this module keeps the tests' and benches' imports (and its CLI) where they
were."""

from __future__ import annotations

from core.library.tiny_gguf import (
    CHATML,
    QUANTS,
    main,
    write_header_heavy_gguf,
    write_mmproj_gguf,
    write_split_gguf,
    write_tiny_gguf,
)

__all__ = ['CHATML', 'QUANTS', 'write_header_heavy_gguf', 'write_mmproj_gguf', 'write_split_gguf', 'write_tiny_gguf']

if __name__ == '__main__':
    main()
