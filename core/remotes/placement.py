"""Where a request for a model held by more than one place goes: this app's own llama-server or a remote's.

Order: places with the model ready first, the least busy of them (its requests in flight from here) first; then, if
it must be loaded somewhere, where it fits best (each node's own fit estimate with its free memory; this app's
from its library), the most free memory first. The rest follow in that order, for failover when the first turns
out to be down. An OpenAI server counts as ready (it serves its models itself). Down remotes are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.remotes import Remote, RemoteModel

FIT_RANK = {'fits': 0, 'tight': 1, 'unknown': 2, 'does not fit': 3}
READY = 'ready'


@dataclass(frozen=True, slots=True)
class Place:
    remote: Remote | None  # None: this app
    model: RemoteModel | None
    ready: bool
    inflight: int
    fit: str  # a FitEstimate label
    free_bytes: int  # free memory where the model would load (VRAM if it has a GPU there, else RAM)

    @property
    def local(self) -> bool:
        return self.remote is None

    def key(self) -> tuple[Any, ...]:
        if self.ready:
            return (0, self.inflight, self.remote is not None)  # a tie stays here: no network hop
        return (1, FIT_RANK.get(self.fit, 2), -self.free_bytes, self.remote is not None)


def remote_place(remote: Remote, model: RemoteModel) -> Place:
    busy = remote.busy.get(model.own_id, 0)
    if remote.params.kind == 'openai':
        return Place(remote, model, True, busy, 'unknown', 0)
    fit = model.row.get('fit') or {}
    free = fit.get('vram_free_bytes') if fit.get('vram_needed_bytes') else None
    if not isinstance(free, int):
        free = fit.get('ram_free_bytes')
    ready = model.status == READY
    return Place(remote, model, ready, busy, str(fit.get('label') or 'unknown'), free if isinstance(free, int) else 0)


def ordered(places: list[Place]) -> list[Place]:
    return sorted(places, key=Place.key)
