"""The benchmark scripts run end to end at tiny size, so they cannot rot (their numbers are not checked here)."""

from __future__ import annotations

import pytest

from benchmarks import gpu_suite, harness


@pytest.mark.slow
def test_harness_runs_every_network_and_method_tiny():
    res = harness.main(["--tiny", "--compile", "none", "--attention", "--clock", "cpu"])
    assert set(res) == {*harness.NETWORKS, "attention"}
    for name in harness.NETWORKS:
        assert set(res[name]) - {"_warmup_s"} == set(harness.METHODS)
        assert res[name]["fm"]["time_x_fm"] == 1.0
        assert res[name]["fm"]["time_iqr"] == [1.0, 1.0]
    assert res["attention"]["blockwise"]["rel_err"] < 1e-5


@pytest.mark.slow
def test_gpu_suite_runs_tiny_on_the_cpu(tmp_path):
    res = gpu_suite.main(["--tiny", "--no-compile", "--json", str(tmp_path / "suite.json")])
    assert res["fused_attention"]["ok"]  # the gradient forward keeps the fused (flash-for-CPU) kernel
    assert set(res["throughput"]["eager"]) - {"_warmup_s"} == set(gpu_suite._methods())
    assert (tmp_path / "suite.json").exists()


def test_tangent_rules_benchmark_runs_tiny(tmp_path):
    from benchmarks import tangent_rules

    res = tangent_rules.main(["--tiny", "--json", str(tmp_path / "rules.json")])
    assert "layer_norm affine" in res and set(res["x - y"]) == {"pytorch", "routed", "plain_ms"}
    assert (tmp_path / "rules.json").exists()
