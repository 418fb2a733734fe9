"""The benchmark scripts run (smoke runs; their figures are not checked here)."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import memory  # noqa: E402
import runtime_overhead  # noqa: E402
import step_time  # noqa: E402


def test_step_time_quick_writes_the_documented_json(tmp_path):
    path = tmp_path / "steps.json"
    step_time.main(["--quick", "--models", "mlp", "--json", str(path)])
    record = json.loads(path.read_text())
    assert {"cpu", "cores", "jax"} <= set(record["machine"])
    names = {row["optimizer"] for row in record["rows"]}
    assert set(step_time.DEFAULT) <= names
    for row in record["rows"]:
        assert {"model", "optimizer", "median_step_s", "ratio_vs_sgd"} <= set(row)
        assert row["median_step_s"] > 0


def test_step_time_rejects_unknown_names():
    with pytest.raises(SystemExit):
        step_time.main(["--quick", "--optimizers", "sgd,lion"])
    with pytest.raises(SystemExit):
        step_time.main(["--quick", "--models", "vit"])


def test_memory_counts_one_extra_parameter_tree_for_the_carried_gradient():
    rows = memory.main(["--models", "mlp"])["rows"]
    extra = {r["optimizer"]: r["extra_state_param_trees"] for r in rows}
    assert extra["sam"] == pytest.approx(0.0, abs=1e-4)
    assert extra["async_sam"] == pytest.approx(1.0, abs=1e-4)
    assert extra["sampa"] == pytest.approx(1.0, abs=1e-4)


def test_runtime_overhead_quick():
    rows = runtime_overhead.main(["--quick"])["rows"]
    loops = {(r["optimizer"], r["loop"]) for r in rows}
    assert ("async_sam", "trainer, two devices") in loops
    assert all(r["median_step_s"] > 0 for r in rows)
