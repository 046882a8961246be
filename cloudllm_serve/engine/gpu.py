"""GPU readings from NVML, for ``/health`` and ``/status/detailed``.

NVML is optional: on a machine without an NVIDIA driver every reading is empty and
the HTTP fields become ``null``. Only the GPUs visible to this process
(``CUDA_VISIBLE_DEVICES``, which Ray sets per replica) are read.
"""

from __future__ import annotations

import os
from typing import Any

from cloudllm_serve.engine.protocol import GpuReading

GIB = 1024**3


def _visible_indexes(device_count: int) -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(device_count))
    indexes = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < device_count:
            indexes.append(int(part))
    return indexes


class GpuMonitor:
    """Reads the visible GPUs through NVML; a no-op where NVML is unavailable."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no driver, no library, no GPU: all mean "no readings"
            self._nvml = None

    def read(self) -> list[GpuReading]:
        """Return one reading per visible GPU (empty without NVML)."""
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        try:
            for index in _visible_indexes(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization: float | None = float(
                        nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    )
                except nvml.NVMLError:
                    utilization = None
                name = nvml.nvmlDeviceGetName(handle)
                readings.append(
                    GpuReading(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        memory_used_gb=round(memory.used / GIB, 3),
                        memory_total_gb=round(memory.total / GIB, 3),
                        utilization_percent=utilization,
                    )
                )
        except nvml.NVMLError:
            return []
        return readings
