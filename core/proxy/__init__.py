"""The OpenAI/Anthropic-compatible proxy. (Filled in by the proxy work.)"""

from __future__ import annotations

from typing import Any


class Proxy:
    def __init__(self, config: Any, scheduler: Any, library: Any, store: Any, bus: Any) -> None:
        self.config, self.scheduler, self.library, self.store, self.bus = config, scheduler, library, store, bus

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def register_routes(self, frontdoor: Any) -> None:
        """Register /v1/*, /upstream/* and the other proxied paths (and the auth guard) on the front door."""
