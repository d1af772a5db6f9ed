"""The CPUs a shard sizes its threads by (affinity bounded by a cgroup quota) and the memory models may take
(the machine's bounded by a cgroup limit), cgroup v2 and v1."""

from __future__ import annotations

import math
import os

from ember.cpus import quota_cpus, usable_cpus


def test_cgroup_v2_quota_bounds_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert quota_cpus(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert quota_cpus(tmp_path) is None and usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota_and_none(tmp_path):
    assert quota_cpus(tmp_path) is None  # no cgroup files at all
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cpus(tmp_path) == 0.5 and usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert quota_cpus(tmp_path) is None


def test_this_machine_reports_at_least_one_cpu_and_no_more_than_its_quota():
    quota = quota_cpus()
    n = usable_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    if quota is not None:
        assert n <= math.ceil(quota)


def test_a_cgroup_memory_limit_bounds_the_memory(tmp_path):
    from ember.cpus import usable_memory

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert usable_memory(tmp_path) == physical  # no cgroup files at all
    (tmp_path / "memory.max").write_text("4294967296\n")
    assert usable_memory(tmp_path) == min(physical, 4 << 30)
    (tmp_path / "memory.max").write_text("max\n")
    assert usable_memory(tmp_path) == physical
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert usable_memory(tmp_path) == min(physical, 1 << 30)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096) + "\n")  # v1's "none"
    assert usable_memory(tmp_path) == physical
