"""What both benchmarks share: process memory readings (CPU), byte formatting, and the machine line.

Each benchmark runs every variant in a fresh process, so these readings are per variant.
"""
from __future__ import annotations

import os
import platform
import resource
import sys

import torch


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); elsewhere the high-water mark, which only makes the delta smaller."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_max_rss() -> bool:
    """Lower this process's RSS high-water mark (ru_maxrss) to its current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB" if abs(n_bytes) >= 2 ** 30 else f"{n_bytes / 2 ** 20:.0f} MiB"


def machine_line(args) -> str:
    if args.device == "cuda":
        where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (not available here)"
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{where}; torch {torch.__version__}; load average (1/5/15 min) {load}"


def require_positive(cli, flags) -> None:
    """Stop with a clear message when a size flag is below 1."""
    for flag in flags:
        if getattr(cli, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(cli, flag)}")
