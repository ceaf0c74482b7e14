"""How many CPU threads llama.cpp gets by default: the physical cores this process may run on.

llama.cpp's own tools default to the physical cores: its math threads gain nothing from a core's
second hardware thread, and more threads than cores make ggml's threads wait for each other.
``os.cpu_count() // 2`` (llama-cpp-python's ``Llama`` default, ours before) is that on a machine with
two hardware threads per core, but only half the cores on one without (most cloud VMs): on a 2-core
VM 2 threads made a synth-3B photo 2.06x faster than 1 on a quiet host (docs/speed.md). A container's
CPU quota (cgroup ``cpu.max``) and the process's CPU affinity bound it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")


def default_threads(*, sysfs: Path = SYSFS_CPU, cgroup: Path = CGROUP, allowed: Iterable[int] | None = None) -> int:
    """The physical cores among the CPUs this process may use, at most its cgroup's CPU quota
    (rounded down, at least 1). Without a readable CPU topology (not Linux): half the logical CPUs."""
    cpus = sorted(allowed) if allowed is not None else _allowed_cpus()
    cores = _physical_cores(sysfs, cpus)
    if cores is None:
        cores = max(1, len(cpus) // 2)
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, quota)) if quota is not None else max(1, cores)


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return list(range(os.cpu_count() or 2))


def _physical_cores(sysfs: Path, cpus: list[int]) -> int | None:
    """Distinct (package, core) pairs of ``cpus``; None when the topology cannot be read."""
    seen = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            seen.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(seen) or None


def _cpu_quota(cgroup: Path) -> int | None:
    """Whole CPUs of a cgroup v2 ``cpu.max`` quota (or v1's cfs quota), None when there is none."""
    for quota_f, period_f in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            if period_f is None:
                quota, _, period = (cgroup / quota_f).read_text().strip().partition(" ")
            else:
                quota, period = (cgroup / quota_f).read_text().strip(), (cgroup / period_f).read_text().strip()
            if quota in ("max", "-1"):
                return None
            return max(1, math.floor(int(quota) / int(period)))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return None
