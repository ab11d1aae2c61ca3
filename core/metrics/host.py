"""Host figures from psutil: CPU, load, memory, disks of the models dirs, network rate, and llama-server processes.

Everything here blocks briefly (it reads /proc), so the sampler calls `HostSampler.sample` in a worker thread.
CPU percentages are measured between consecutive calls, like `top`, which is why one sampler keeps the state.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil


class HostSampler:
    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._net: tuple[float, int, int] | None = None
        # Prime the system-wide CPU counters so the first real sample measures an interval, not "since boot".
        psutil.cpu_percent(percpu=True)
        psutil.cpu_percent()

    def sample(self, models_dirs: list[Path], pids: dict[str, int]) -> dict[str, Any]:
        """`pids` maps model id -> llama-server pid. Returns `system` and `processes` sections."""
        return {'system': self.system(models_dirs), 'processes': self.processes(pids)}

    def system(self, models_dirs: list[Path]) -> dict[str, Any]:
        per_core = psutil.cpu_percent(percpu=True)
        total = psutil.cpu_percent()
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        try:
            load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
        except OSError:  # not available on this platform
            load = None
        return {
            'cpu_pct': total,
            'cpu_per_core_pct': per_core,
            'cpu_count': len(per_core),
            'load_avg': load,
            'ram_total_bytes': vm.total,
            'ram_used_bytes': vm.total - vm.available,
            'ram_available_bytes': vm.available,
            'ram_pct': vm.percent,
            'swap_total_bytes': sw.total,
            'swap_used_bytes': sw.used,
            'swap_pct': sw.percent,
            'disks': self.disks(models_dirs),
            'net': self.net(),
        }

    @staticmethod
    def disks(models_dirs: list[Path]) -> list[dict[str, Any]]:
        out = []
        for d in models_dirs:
            try:
                du = psutil.disk_usage(str(d))
            except OSError as e:  # a models dir that is missing or unmounted
                out.append({'path': str(d), 'error': str(e)})
                continue
            out.append(
                {
                    'path': str(d),
                    'total_bytes': du.total,
                    'used_bytes': du.used,
                    'free_bytes': du.free,
                    'pct': du.percent,
                }
            )
        return out

    def net(self) -> dict[str, Any]:
        c = psutil.net_io_counters()
        now = time.monotonic()
        prev, self._net = self._net, (now, c.bytes_sent, c.bytes_recv)
        if prev is None or now <= prev[0]:
            sent_rate = recv_rate = None
        else:
            dt = now - prev[0]
            sent_rate = max(0.0, (c.bytes_sent - prev[1]) / dt)
            recv_rate = max(0.0, (c.bytes_recv - prev[2]) / dt)
        return {
            'bytes_sent': c.bytes_sent,
            'bytes_recv': c.bytes_recv,
            'sent_bytes_per_s': sent_rate,
            'recv_bytes_per_s': recv_rate,
        }

    def processes(self, pids: dict[str, int]) -> dict[str, dict[str, Any]]:
        """RSS, CPU % (of one core; >100 when multi-threaded), threads and uptime of each model's server."""
        out: dict[str, dict[str, Any]] = {}
        live: dict[int, psutil.Process] = {}
        for model, pid in pids.items():
            proc = self._procs.get(pid)
            try:
                first = proc is None
                if proc is None:
                    proc = psutil.Process(pid)
                with proc.oneshot():
                    mem = proc.memory_info()
                    cpu = proc.cpu_percent()  # the first call only primes the counter
                    out[model] = {
                        'pid': pid,
                        'rss_bytes': mem.rss,
                        'cpu_pct': None if first else cpu,
                        'threads': proc.num_threads(),
                        'uptime_s': max(0.0, time.time() - proc.create_time()),
                    }
                live[pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess) as e:
                out[model] = {'pid': pid, 'error': type(e).__name__}
        self._procs = live  # forget processes that are gone
        return out
