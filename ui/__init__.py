"""Pages: one module per page plus the shared frame. Pages call core methods and subscribe to core events."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.system import System


def register_pages(system: System) -> None:
    from ui import activity, chat, dashboard, downloads, login, logs, models, monitoring, nodes, settings

    for page in (dashboard, models, downloads, activity, monitoring, nodes, logs, settings, chat, login):
        page.register(system)
