"""A background sampler of GPU (pynvml) and host (psutil) figures, one JSON line per sample.

One per node (local rank 0), into RunPaths.system(host). Without NVIDIA GPUs it records host
figures only and says once why. It never raises into the training loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from ..core.background import Background
from ..core.jsonl import JsonlWriter
from .health import HealthLimits, conditions

log = logging.getLogger(__name__)
HISTORY = 400


class _Gpus:
    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # no driver, no library, no devices: host figures only
            self.reason = f"{type(exc).__name__}: {exc}"

    def sample(self) -> list[dict[str, Any]]:
        out = []
        for i, h in enumerate(self.handles):
            nv = self.nvml
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "util_pct": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                        "mem_used_gb": mem.used / 1e9, "mem_total_gb": mem.total / 1e9,
                        "temp_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                        "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0})
        return out


class SystemMonitor(Background):
    thread_name = "telepathy-monitor"

    def __init__(self, path: Path, run_dir: Path, interval_s: float,
                 limits: HealthLimits = HealthLimits()):
        self.path = path
        self.run_dir = run_dir
        self.interval_s = interval_s
        self.limits = limits
        super().__init__()
        self._process = psutil.Process()
        self._history: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self.samples = 0
        self.busy_s = 0.0

    def sample(self, gpus: _Gpus) -> dict[str, Any]:
        disk = shutil.disk_usage(self.run_dir)
        vm = psutil.virtual_memory()
        return {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                "gpus": gpus.sample(), "cpu_pct": psutil.cpu_percent(None),
                "ram_used_gb": (vm.total - vm.available) / 1e9, "ram_total_gb": vm.total / 1e9,
                "disk_free_gb": disk.free / 1e9, "rss_gb": self._process.memory_info().rss / 1e9}

    def _run(self) -> None:
        gpus = _Gpus()
        writer = JsonlWriter(self.path)
        if gpus.reason:
            log.info("monitor: no NVIDIA GPU figures (%s); recording host figures only", gpus.reason)
            writer.write({"time": time.time(), "note": "host figures only", "reason": gpus.reason})
        psutil.cpu_percent(None)
        try:
            while not self._stop.wait(self.interval_s):
                self._take(gpus, writer)
            # One last sample as the allocation ends, so that every allocation, however much
            # shorter than the interval it was, leaves the host's figures behind it.
            self._take(gpus, writer)
        finally:
            writer.close()

    def _take(self, gpus: _Gpus, writer: JsonlWriter) -> None:
        started = time.perf_counter()
        try:
            record = self.sample(gpus)
        except Exception as exc:  # a sampler must never take the run down
            log.warning("monitor: sampling failed: %s", exc)
            return
        writer.write(record)
        self._history = (self._history + [record])[-HISTORY:]
        self._warn(conditions(self._history, self.limits))
        self.samples += 1
        self.busy_s += time.perf_counter() - started

    def _warn(self, now: dict[str, str]) -> None:
        for key in now.keys() - self._warned:
            log.warning("monitor: %s", now[key])
        for key in self._warned - now.keys():
            log.info("monitor: cleared: %s", key)
        self._warned = set(now)

