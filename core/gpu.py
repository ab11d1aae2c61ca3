"""NVIDIA GPUs through NVML (`pynvml` from the `nvidia-ml-py` distribution).

NVML is initialised once, lazily, and kept for the life of the process. Every function here may block (NVML talks
to the driver), so callers on the event loop run them with `asyncio.to_thread`. No driver or library means
`available()` is False and the readers return empty results; an error on one NVML call degrades that field only
(it reads None) and never the whole GPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar

log = logging.getLogger(__name__)

NO_GPU_MESSAGE = 'no NVIDIA GPU detected'
T = TypeVar('T')


@dataclass(slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None


@dataclass(slots=True)
class GpuInfo:
    index: int
    name: str | None = None
    uuid: str | None = None
    utilization_pct: float | None = None
    memory_utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    temperature_c: float | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    fan_pct: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # fields NVML could not read on this GPU

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def memory_used_pct(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d['pids'] = self.pids
        d['memory_used_pct'] = self.memory_used_pct
        return d


class _Nvml:
    """The process-wide NVML handle: one init attempt, remembered (success or the reason it failed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._ok = False
        self.error: str | None = None
        self.driver_version: str | None = None
        self.mod: Any = None

    def ensure(self) -> bool:
        with self._lock:
            if self._tried:
                return self._ok
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self.mod = pynvml
                self._ok = True
                self.driver_version = _text(_try(pynvml.nvmlSystemGetDriverVersion))
            except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
                self.error = f'{type(e).__name__}: {e}'
                log.info('NVML unavailable (%s): %s', self.error, NO_GPU_MESSAGE)
            return self._ok

    def shutdown(self) -> None:
        with self._lock:
            if self._ok and self.mod is not None:
                _try(self.mod.nvmlShutdown)
            self._tried = self._ok = False
            self.mod = None


_nvml = _Nvml()


def available() -> bool:
    """True once NVML initialised and sees the driver (the first call initialises it; may block briefly)."""
    return _nvml.ensure()


def unavailable_reason() -> str | None:
    _nvml.ensure()
    return None if _nvml._ok else (_nvml.error or NO_GPU_MESSAGE)


def shutdown() -> None:
    """Release NVML (tests and a clean exit); the next call initialises it again."""
    _nvml.shutdown()


def gpus() -> list[GpuInfo]:
    """Every GPU's name, utilization, memory, temperature, power, fan and the pids using it. Blocking."""
    if not _nvml.ensure():
        return []
    nv = _nvml.mod
    count = _try(nv.nvmlDeviceGetCount)
    if count is None:
        return []
    return [_read_gpu(nv, i) for i in range(count)]


def status() -> dict[str, Any]:
    """What the UI and `/api/monitoring` show: `available`, a message when not, driver version, the GPUs."""
    items = gpus()
    ok = _nvml._ok
    return {
        'available': ok and bool(items),
        'message': None if ok and items else NO_GPU_MESSAGE,
        'reason': None if ok else _nvml.error,
        'driver_version': _nvml.driver_version,
        'gpus': [g.as_dict() for g in items],
    }


def free_vram_bytes() -> int | None:
    """Free memory summed over every GPU, or None without NVML (the library's memory-fit estimate). Blocking."""
    items = gpus()
    frees = [g.memory_free_bytes for g in items if g.memory_free_bytes is not None]
    if not frees:
        return None
    return sum(frees)


def total_vram_bytes() -> int | None:
    items = gpus()
    totals = [g.memory_total_bytes for g in items if g.memory_total_bytes is not None]
    return sum(totals) if totals else None


def _read_gpu(nv: Any, index: int) -> GpuInfo:
    info = GpuInfo(index=index)
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:
        info.errors.append(f'handle: {e}')
        return info

    def read(name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as e:  # NVMLError_NotSupported etc.: this field only
            info.errors.append(f'{name}: {e}')
            return None

    info.name = _text(read('name', lambda: nv.nvmlDeviceGetName(h)))
    info.uuid = _text(read('uuid', lambda: nv.nvmlDeviceGetUUID(h)))
    util = read('utilization', lambda: nv.nvmlDeviceGetUtilizationRates(h))
    if util is not None:
        info.utilization_pct = float(util.gpu)
        info.memory_utilization_pct = float(util.memory)
    mem = read('memory', lambda: nv.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        info.memory_used_bytes, info.memory_total_bytes, info.memory_free_bytes = (
            int(mem.used),
            int(mem.total),
            int(mem.free),
        )
    temp = read('temperature', lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
    info.temperature_c = None if temp is None else float(temp)
    power = read('power_draw', lambda: nv.nvmlDeviceGetPowerUsage(h))  # milliwatts
    info.power_draw_w = None if power is None else power / 1000.0
    limit = read('power_limit', lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    info.power_limit_w = None if limit is None else limit / 1000.0
    fan = read('fan', lambda: nv.nvmlDeviceGetFanSpeed(h))  # data-centre GPUs have no fan: NotSupported
    info.fan_pct = None if fan is None else float(fan)
    procs: dict[int, GpuProcess] = {}
    for kind, getter in (
        ('compute_processes', nv.nvmlDeviceGetComputeRunningProcesses),
        ('graphics_processes', nv.nvmlDeviceGetGraphicsRunningProcesses),
    ):
        for p in read(kind, partial(getter, h)) or []:
            used = getattr(p, 'usedGpuMemory', None)
            # NVML reports "not available" as a huge sentinel value (NVML_VALUE_NOT_AVAILABLE).
            used = int(used) if isinstance(used, int) and 0 <= used < (1 << 62) else None
            procs.setdefault(int(p.pid), GpuProcess(int(p.pid), used))
    info.processes = list(procs.values())
    return info


def _try(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:
        return None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode(errors='replace') if isinstance(v, bytes) else str(v)
