"""How many CPUs and how much memory this process may really use: its affinity bounded by a cgroup CPU
quota, and the machine's memory bounded by a cgroup memory limit.

Containers are commonly limited by a quota (Docker's `--cpus`, Kubernetes' `limits.cpu`), not by
affinity: the process still sees every core of the node, and a thread pool sized by the cores it sees
is throttled into stalls. Each parallel region of a forward waits for its slowest thread, so torch's
intra-op threads must not outnumber the CPUs the quota pays for.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_cpus(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 `cpu.max`, or v1's CFS quota); None: none."""
    own = _own_cgroup_v2(root)
    for candidate in [p for p in (own, root) if p is not None]:
        try:
            quota, period = (candidate / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _own_cgroup_v2(root: Path) -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may run on (affinity), at most its quota rounded up; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = quota_cpus(root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def usable_memory(root: Path = CGROUP) -> int:
    """Bytes of memory this process may use: the machine's, bounded by its cgroup's limit (v2 `memory.max`,
    or v1's `memory.limit_in_bytes`). A container limited to 4 GiB on a 64 GiB node sees 4 GiB: what the
    kernel's OOM killer will enforce, whatever /proc/meminfo says."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    own = _own_cgroup_v2(root)
    for candidate in [p for p in (own, root) if p is not None]:
        try:
            limit = (candidate / "memory.max").read_text().strip()
        except OSError:
            continue
        return physical if limit == "max" else min(physical, int(limit))
    try:
        limit = int((root / "memory" / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError):
        return physical
    return min(physical, limit)  # v1 writes a huge number for "no limit"
