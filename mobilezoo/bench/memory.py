"""Peak resident memory of one call, from Linux's per-process high-water mark."""
from __future__ import annotations

import ctypes
import gc
from typing import Callable


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status (e.g. VmRSS, VmHWM) in kB; OSError off Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_rss_delta_mb(fn: Callable[[], object]) -> float | None:
    """Run `fn` once; the rise of the resident-set high-water mark over the current RSS, in MB (None
    off Linux).

    Freed heap is returned to the OS first (glibc `malloc_trim`): pages that earlier, larger runs
    left resident would otherwise absorb this run's allocations without raising the RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        before = proc_status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return round(max(proc_status_kb("VmHWM") - before, 0) / 1024, 1)
