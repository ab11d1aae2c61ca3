"""How long one full garbage collection stops the loop, over the objects the app's imports and startup build,
before and after `gc.freeze()` (main.py's `freeze_startup_objects`), with a request-sized heap on top.

    .venv/bin/python bench/gc_pause.py
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def full_pass_ms(n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def made_by_load() -> list[dict[str, object]]:
    """What load keeps alive: the log ring buffer's 10k records, the recent requests' rows."""
    return [{'seq': i, 'message': f'line {i}', 'data': [i]} for i in range(20_000)]


async def measured(system: object) -> tuple[float, float]:
    """Full-pass times with the System started (as main.py freezes), before and after the freeze."""
    import main as app_main

    await system.start()  # type: ignore[attr-defined]
    try:
        alive = made_by_load()
        print(f'objects tracked: {len(gc.get_objects())}')
        before = full_pass_ms()
        del alive
        app_main.freeze_startup_objects()
        alive = made_by_load()  # after the freeze, as in the running app
        after = full_pass_ms()
        del alive
        return before, after
    finally:
        await system.stop()  # type: ignore[attr-defined]


def main() -> None:
    import main as app_main

    with tempfile.TemporaryDirectory() as tmp:
        os.environ['LAP_DATA_DIR'] = str(Path(tmp) / 'data')
        system = app_main.build(app_main.parse_args(['--models-dir', tmp]))
        before, after = asyncio.run(measured(system))
        print(f'full collection: {before:.1f} ms before gc.freeze(), {after:.1f} ms after (20000 live rows)')


if __name__ == '__main__':
    main()
