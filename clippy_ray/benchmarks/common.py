"""What every bench shares: repetitions with their spread, peak memory on any device, the device's
description, and the JSON record each bench writes with `--json PATH`."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")


def write_json(path: str | None, bench: str, args: argparse.Namespace, results: dict) -> None:
    """{bench, command, args, machine, finished, results} to `path` (nothing without one)."""
    if not path:
        return
    record = {
        "bench": bench,
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "args": vars(args),
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(out)


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def spread(values: list[float]) -> dict:
    """median, min, max and the values themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def describe(values: list[float], fmt: str = "{:.2f}") -> str:
    """'median (min-max)'."""
    s = spread(values)
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


class OperatorCounts(TorchDispatchMode):
    """Counts the operators dispatched while active, by name (`counts`)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes allocated above the level at entry, inside the `with` block. CUDA: the caching
    allocator's statistics. CPU (Linux): the kernel's resident-set high-water mark, reset at entry
    through /proc/self/clear_refs after glibc returns freed heap pages (malloc_trim); it counts
    every page the block touched, so it is an upper bound. `peak` is None where neither works."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _reset_rss_high_water()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.peak = _status_bytes("VmHWM") - self._base


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _reset_rss_high_water() -> int | None:
    """Current resident bytes, with the high-water mark reset to them; None off Linux."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return _status_bytes("VmRSS")
    except OSError:
        return None
