"""Model library: discovery, GGUF metadata and fit estimates. (Filled in by the model-library work.)"""

from __future__ import annotations

from typing import Any


class ModelLibrary:
    def __init__(self, config: Any, store: Any, bus: Any) -> None:
        self.config, self.store, self.bus = config, store, bus

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def models(self) -> list[Any]:
        return []
