"""Model library: discovery, lazy GGUF header metadata (cached in SQLite), folder watching and fit estimates.

`ModelLibrary(config, store, bus)` is the service; see docs/ARCHITECTURE.md for its contract.
"""

from __future__ import annotations

from core.library.fit import FitEstimate
from core.library.library import ModelEntry, ModelLibrary, ScanReport
from core.library.meta import ModelMeta

__all__ = ['FitEstimate', 'ModelEntry', 'ModelLibrary', 'ModelMeta', 'ScanReport']
