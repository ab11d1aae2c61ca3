"""Loads and unloads that race each other, each run many times with every outcome asserted (issue 14, item 4):
two loads for one slot are served in order, never both failed; an unload during a load cancels it, and the load's
caller is told so (409 "unloaded while loading"), never a 502."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.supervisor import ModelState, Unloaded
from tests.conftest import wait_for

RUNS = 20


@pytest.fixture
async def one_slot(system_factory: Callable[..., Any], models_dir: Path, tiny_model: Path, tiny_model_b: Path) -> Any:
    return await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, max_loaded_models=1)


async def test_two_loads_for_one_slot_are_served_in_order(one_slot: Any) -> None:
    scheduler = one_slot.scheduler
    for run in range(RUNS):
        pair = ('tiny-llama', 'tiny-llama-b') if run % 2 == 0 else ('tiny-llama-b', 'tiny-llama')
        results = await asyncio.gather(*(scheduler.load(m) for m in pair), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f'run {run}: {errors}'  # both answered ready, each in its turn
        assert [r.model_id for r in results] == list(pair)
        # One slot: whichever got it second swapped the other out once that one was answered.
        states = await wait_for(
            lambda pair=pair: (
                sorted(str(scheduler.describe(m)['status']) for m in pair) == ['ready', 'stopped']
                and [scheduler.describe(m)['status'] for m in pair]
            ),
            deadline_s=10,
        )
        assert states.count(ModelState.READY) == 1, f'run {run}: {states}'


async def test_an_unload_during_a_load_cancels_it_with_a_clear_error(one_slot: Any) -> None:
    scheduler = one_slot.scheduler
    for run in range(RUNS):
        load = asyncio.create_task(scheduler.load('tiny-llama'))
        await wait_for(lambda: scheduler.describe('tiny-llama')['status'] == ModelState.STARTING, deadline_s=10)
        assert await scheduler.unload('tiny-llama')
        with pytest.raises(Unloaded, match='unloaded while loading') as caught:
            await load
        assert caught.value.status == 409, f'run {run}'
        assert scheduler.describe('tiny-llama')['status'] == ModelState.STOPPED
    # And the next load is a fresh one that works.
    up = await scheduler.load('tiny-llama')
    assert up.port and scheduler.describe('tiny-llama')['status'] == ModelState.READY


async def test_an_unload_during_a_load_answers_409_over_http(make_served: Any) -> None:
    async with await make_served(max_loaded_models=1) as served, served.client() as client:
        scheduler = served.system.scheduler
        load = asyncio.create_task(client.post('/api/models/tiny-llama/load'))
        await wait_for(lambda: scheduler.describe('tiny-llama')['status'] == ModelState.STARTING, deadline_s=10)
        assert (await client.post('/api/models/tiny-llama/unload')).status_code == 200
        r = await load
    assert r.status_code == 409 and 'unloaded while loading' in r.json()['detail']['message']
