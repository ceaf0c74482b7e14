"""The default llama.cpp threads (engines/threads.py) on made-up CPU topologies and cgroup quotas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clue2geo_sdk.engines import make_engine
from clue2geo_sdk.engines.threads import default_threads


def _topology(root: Path, cores: list[tuple[int, int]]) -> Path:
    """A sysfs cpu folder: logical CPU i on (package, core) ``cores[i]``."""
    for i, (pkg, core) in enumerate(cores):
        topo = root / "cpu" / f"cpu{i}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{pkg}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root / "cpu"


def _cgroup(root: Path, cpu_max: str | None) -> Path:
    cg = root / "cgroup"
    cg.mkdir()
    if cpu_max is not None:
        (cg / "cpu.max").write_text(cpu_max + "\n")
    return cg


@pytest.mark.parametrize(
    ("cores", "allowed", "cpu_max", "want"),
    [
        ([(0, 0), (0, 1)], [0, 1], "max 100000", 2),  # a 2-core VM, one thread per core: both cores
        ([(0, 0), (0, 1), (0, 0), (0, 1)], [0, 1, 2, 3], None, 2),  # 2 cores x 2 hardware threads
        ([(0, 0), (0, 1), (1, 0), (1, 1)], [0, 1, 2, 3], None, 4),  # two packages reuse core ids
        ([(0, 0), (0, 1), (0, 2), (0, 3)], [1, 2], None, 2),  # affinity: only the CPUs allowed
        ([(0, c) for c in range(8)], list(range(8)), "150000 100000", 1),  # a 1.5-CPU quota: 1 thread
        ([(0, c) for c in range(8)], list(range(8)), "400000 100000", 4),
        ([(0, c) for c in range(2)], [0, 1], "800000 100000", 2),  # a quota above the cores
    ],
)
def test_default_threads_are_the_physical_cores_within_the_quota(
    tmp_path: Path, cores: list[tuple[int, int]], allowed: list[int], cpu_max: str | None, want: int
) -> None:
    sysfs = _topology(tmp_path, cores)
    assert default_threads(sysfs=sysfs, cgroup=_cgroup(tmp_path, cpu_max), allowed=allowed) == want


def test_without_a_topology_half_the_logical_cpus(tmp_path: Path) -> None:
    cg = _cgroup(tmp_path, None)
    assert default_threads(sysfs=tmp_path / "none", cgroup=cg, allowed=range(8)) == 4
    assert default_threads(sysfs=tmp_path / "none", cgroup=cg, allowed=[0]) == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    sysfs = _topology(tmp_path, [(0, c) for c in range(8)])
    cg = tmp_path / "cgroup"
    (cg / "cpu").mkdir(parents=True)
    (cg / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (cg / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert default_threads(sysfs=sysfs, cgroup=cg, allowed=range(8)) == 3
    (cg / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert default_threads(sysfs=sysfs, cgroup=cg, allowed=range(8)) == 8


def test_the_engines_get_this_hosts_default(demo_bundle: Path) -> None:
    from clue2geo_sdk import Bundle

    b = Bundle.open(demo_bundle, verify=False)
    for name in ("batched", "chat"):
        eng = make_engine(name, b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=1)
        try:
            assert eng.n_threads == default_threads() <= len(os.sched_getaffinity(0))
        finally:
            eng.close()
