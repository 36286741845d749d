"""How many cores this process may use: the default of ``SERVER_PROCESSES``.

``os.cpu_count()`` is the machine's count. A container limited to two CPUs on a 64-core node sees 64, and a service
that started a server process per core would open 64 pools against PostgreSQL's connection limit and hold 64 text
indexes in two CPUs' worth of time. So the default takes the smaller of the CPUs the process may be scheduled on
(its affinity: ``taskset``, cpusets) and its CPU quota (a container's CPU limit: cgroup v2 ``cpu.max``, or v1
``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, the lowest along its cgroup's path), rounded up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cores(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The cores this process may use, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time the process's cgroups allow per period (the lowest along the path); None: no limit, or
    nothing readable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # cgroup v2: one unified hierarchy
            limits += _along(cgroup_root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            for mount in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct", cgroup_root / controllers):
                if mount.is_dir():
                    limits += _along(mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _along(mount: Path, path: str, limit_of: Callable[[Path], float | None]) -> list[float]:
    """The limits set on the process's cgroup and its ancestors (a namespaced cgroup reads "/": its own root)."""
    found = []
    parts = [p for p in path.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        limit = limit_of(mount.joinpath(*parts[:depth]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(directory: Path) -> float | None:
    """``cpu.max``: "max 100000" (no limit) or "QUOTA PERIOD" in microseconds."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _ratio(quota, period)


def _v1_limit(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1: no limit) over ``cpu.cfs_period_us``."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
