"""Placement order among the places that hold one model (core/remotes/placement.py)."""

from __future__ import annotations

from core.remote_params import RemoteParams
from core.remotes import Remote, RemoteModel
from core.remotes.placement import Place, ordered, remote_place


def node(name: str, status: str | None, fit: str = 'fits', free: int = 0, inflight: int = 0) -> Place:
    remote = Remote(RemoteParams(name=name, url=f'http://{name}:8080', kind='node'))
    remote.busy['m'] = inflight
    row = {'fit': {'label': fit, 'ram_free_bytes': free, 'vram_needed_bytes': 0}}
    return remote_place(remote, RemoteModel('m', 'm', status, row))


def here(ready: bool, inflight: int = 0, fit: str = 'fits', free: int = 0) -> Place:
    return Place(None, None, ready, inflight, fit, free)


def names(places: list[Place]) -> list[str]:
    return ['here' if p.local else p.remote.name for p in ordered(places)]  # type: ignore[union-attr]


def test_ready_places_first_the_least_busy_first_and_a_tie_stays_here() -> None:
    assert names([node('a', 'stopped'), node('b', 'ready', inflight=3), node('c', 'ready', inflight=1)]) == [
        'c',
        'b',
        'a',
    ]
    assert names([node('a', 'ready', inflight=1), here(True, inflight=1)]) == ['here', 'a']
    assert names([node('a', 'ready'), here(False)]) == ['a', 'here']


def test_when_nothing_is_ready_the_best_fit_then_the_most_free_memory() -> None:
    places = [
        here(False, fit='does not fit', free=10**12),
        node('tight', 'stopped', 'tight', free=10**12),
        node('small', 'stopped', 'fits', free=10**9),
        node('big', 'stopped', 'fits', free=10**10),
    ]
    assert names(places) == ['big', 'small', 'tight', 'here']


def test_an_openai_server_counts_as_ready() -> None:
    remote = Remote(RemoteParams(name='cloud', url='http://cloud/v1'))
    assert remote_place(remote, RemoteModel('m', 'm')).ready
