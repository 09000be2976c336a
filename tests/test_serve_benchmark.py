"""CI's small run of `python -m benchmarks.scale` (its own private local Ray cluster, shut down at the end)."""

from __future__ import annotations

import pytest

pytest.importorskip("engine.serve")  # needs ray[serve]; sets Serve's throughput mode before ray.serve is imported
pytestmark = pytest.mark.slow


def test_small_scale_benchmark_with_a_killed_replica():
    """CI's small version of `python -m benchmarks.scale --replicas 2 --clients 30 --kill-one`."""
    from benchmarks.scale import run

    result = run(2, 4, kill_one=True, questions=3, timeout_s=120, repeats=1)
    assert (result["answered"], result["failed"], result["replicas"]) == (4, 0, 2)
    assert result["killed_replica"] and result["engine"] == "ray_serve"
    assert result["answers"] == 12 and result["speedup_2_over_1"] > 0 and 0 <= result["cache_hit_rate"] <= 1
    assert [p["replicas"] for p in result["phases"]] == [1, 2, 2] and result["phases"][-1]["killed_replica"]
