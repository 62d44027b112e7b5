"""Peak memory of a window of work (a training stage, a benchmark): CUDA's allocator statistics on a GPU, the
process's resident-set high-water mark on a Linux CPU."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (per stage, so runs sharing a process each report their own peak): CUDA's
    allocator statistics on a GPU; on Linux CPUs the process's resident-set high-water mark (clear_refs "5")."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole process
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: allocated CUDA memory on a GPU, the resident set's high-water mark on
    a CPU (VmHWM; the process's maximum resident set size where /proc is absent)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
