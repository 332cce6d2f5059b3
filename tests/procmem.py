"""Peak resident memory of a process, from ``/proc/<pid>/status`` (Linux)."""

from __future__ import annotations

from pathlib import Path

from relay.tools import processes


def hwm_mb(pid: int) -> float:
    """``VmHWM``: the kernel's high-water mark of the resident set of a live process, in MiB
    (exact, unlike sampling VmRSS, which can miss a short peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmHWM in /proc/{pid}/status")


def peak_rss_mb(relay: processes.RelayProcess) -> float:
    """The peak RSS of a live relay process: its VmHWM, or its sampled VmRSS peak if higher."""
    return round(max(hwm_mb(relay.pid), relay.peak_rss_mb()), 1)
