"""What the machine charges for a wakeup, printed beside a benchmark's ratios.

A proxy adds a process hop each way, so its ratio to direct depends on what waking another process costs, and on
these shared VMs that swings by several times between hours: on 2026-12-01 a socket round trip between two processes
took ~70 us when they sat on different CPUs and ~12 us on one (bare metal: a few us either way), and the proxy's one
write to llama-server per request took ~350 us of wall time for ~40 us of its CPU. That VM boots with guest halt
polling off (`haltpoll.guest_halt_poll_ns=0`), so a CPU that waits is halted and each wakeup of it goes through the
hypervisor; left as it is (the machine's setting, not ours). Runs are only comparable when this figure is alike.

    .venv/bin/python bench/machine.py
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path

ROUND_TRIPS = 5000
HALT_POLL = Path('/sys/module/haltpoll/parameters/guest_halt_poll_ns')


def round_trip_us(parent_cpu: int | None = None, child_cpu: int | None = None, n: int = ROUND_TRIPS) -> float:
    """Median over 5 batches of the per-message time of a 1-byte ping-pong between two processes over a socket pair,
    each pinned to the given CPU (None: where the scheduler puts it)."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echoing child
        try:
            if child_cpu is not None:
                os.sched_setaffinity(0, {child_cpu})
            for _ in range(5 * n):
                b.recv(1)
                b.send(b'y')
        finally:
            os._exit(0)
    before = os.sched_getaffinity(0)
    try:
        if parent_cpu is not None:
            os.sched_setaffinity(0, {parent_cpu})
        batches = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                a.send(b'x')
                a.recv(1)
            batches.append(1e6 * (time.perf_counter() - t0) / n)
    finally:
        os.sched_setaffinity(0, before)
        os.waitpid(pid, 0)
        a.close()
        b.close()
    return statistics.median(batches)


def halt_poll_ns() -> int | None:
    """A KVM guest's halt polling (`haltpoll.guest_halt_poll_ns`): 0 means an idle CPU halts at once, and waking it
    is a trip through the hypervisor. None where the guest driver is absent."""
    try:
        return int(HALT_POLL.read_text())
    except (OSError, ValueError):
        return None


def wakeup_summary() -> str:
    """'socket round trip between processes: X us across CPUs, Y us on one' (one CPU only: the latter), and the
    guest's halt polling where there is one."""
    cpus = sorted(os.sched_getaffinity(0))
    same = round_trip_us(cpus[0], cpus[0])
    poll = halt_poll_ns()
    guest = '' if poll is None else f' (guest halt polling {poll} ns)'
    if len(cpus) < 2:
        return f'socket round trip between processes: {same:.0f} us (one CPU){guest}'
    across = round_trip_us(cpus[0], cpus[1])
    return f'socket round trip between processes: {across:.0f} us across CPUs, {same:.0f} us on one{guest}'


if __name__ == '__main__':
    print(wakeup_summary())
