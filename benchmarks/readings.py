"""Memory and time readings of a step (measure), how a results table shows them, and the machine line."""
from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import time

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


def measure(step, device: torch.device) -> dict:
    """Run `step()` (it returns a dict) once; add its wall time, its CPU time (all threads of the process) and
    its peak memory above the state before it:
      GPU  torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, minus
           torch.cuda.memory_allocated before the step (bytes in live tensors);
      CPU  ru_maxrss after the step minus the RSS before it, the high-water mark first lowered to the current
           RSS through /proc/self/clear_refs (Linux ≥ 4.0; `exact` is False where that is refused, and the
           high-water mark then covers the process's whole life). RSS keeps the pages of small freed blocks that
           the allocator has not returned; glibc returns blocks above its mmap threshold (32 MB at most) at once,
           so that residue can only make a delta slightly smaller.
    """
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, exact = torch.cuda.memory_allocated(device), True
    else:
        before = current_rss_bytes()
        exact = reset_max_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = (torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - before
    # RSS read just before the reset may exceed what the reset records by a few pages: no growth is 0
    return dict(result, seconds=seconds, cpu_seconds=cpu_seconds, peak_bytes=max(peak, 0), before_bytes=before,
                exact=exact)


def step_time(r: dict, device: str) -> float:
    """The time a target compares. On a CPU, the process's CPU time: the step's own work, which other jobs on a
    shared machine move much less than its wall time (here, at load 5–12 on 2 cores, two processes taking turns
    at the same step differed by up to 1.33× in wall time and 1.13× in CPU time). On a GPU, wall time."""
    return r["cpu_seconds"] if device == "cpu" else r["seconds"]


def time_cell(r: dict, device: str) -> str:
    return f"{r['seconds']:.3g} s" + (f" ({r['cpu_seconds']:.3g} s CPU)" if device == "cpu" else "")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB" if abs(n_bytes) >= 2 ** 30 else f"{n_bytes / 2 ** 20:.0f} MiB"


def machine_line(device: str) -> str:
    if device == "cuda":
        where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (not available here)"
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}; load average (1/5/15 min) {load_average()}"


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
