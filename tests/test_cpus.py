"""The CPUs a shard sizes its threads by: affinity, bounded by a cgroup quota (v2 and v1)."""

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
