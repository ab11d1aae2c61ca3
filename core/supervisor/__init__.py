"""Supervisor and scheduler: every llama-server process. (Filled in by the supervisor work.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Scheduler:
    def __init__(self, config: Any, library: Any, binary: Any, logs: Any, bus: Any, data_dir: Path) -> None:
        self.config, self.library, self.binary, self.logs, self.bus, self.data_dir = (
            config,
            library,
            binary,
            logs,
            bus,
            data_dir,
        )

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def describe(self, model_id: str) -> dict[str, Any]:
        """Live status of one model for /api/models: status, pid, port, uptime_s, restarts, inflight, error."""
        return {
            'status': 'stopped',
            'pid': None,
            'port': None,
            'uptime_s': None,
            'restarts': 0,
            'inflight': 0,
            'error': None,
        }
