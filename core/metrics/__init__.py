"""Metrics: the one shared sampler, history and Prometheus exposition. (Filled in by the metrics work.)"""

from __future__ import annotations

from typing import Any


class MetricsService:
    def __init__(self, config: Any, scheduler: Any, library: Any, store: Any, bus: Any) -> None:
        self.config, self.scheduler, self.library, self.store, self.bus = config, scheduler, library, store, bus

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def register_routes(self, frontdoor: Any) -> None:
        """Register long-lived streams (/api/events) on the front door."""
