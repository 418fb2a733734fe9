"""The benchmark scripts run (smoke runs; their figures are not checked here)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import frontier  # noqa: E402
import hetero.cli  # noqa: E402
import hetero.sweep  # noqa: E402
import heterogeneous  # noqa: E402
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


# --- benchmarks/heterogeneous.py -----------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
HETEROGENEOUS_ROWS = {
    "sgd",
    "sgd/trainer",
    "sam",
    "sam/trainer",
    "async_sam/host/calibrated",
    "async_sam/host/b/4",
    "async_sam/host/b/8",
    "async_sam/accelerator",
    "async_sam/accelerator/trainer",
    "sampa/vmap",
    "sampa/vmap/trainer",
    "sampa/two",
    "sampa/two/trainer",
}


def test_heterogeneous_smoke_writes_every_row_naming_where_each_gradient_ran(
    tmp_path,
):
    """The command the accelerator will run, with tiny sizes on two CPU devices."""
    out = subprocess.run(
        [sys.executable, "benchmarks/heterogeneous.py", "--smoke", "--out", tmp_path],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["complete"] and "stopped" not in record
    parts = record["parts"]
    assert set(parts) == {
        "machine",
        "calibration",
        "step_time",
        "timeline",
        "time_to_accuracy",
        "sweep",
    }
    assert {"cpu", "cores", "accelerator", "versions"} <= set(parts["machine"])
    assert {"jax", "jaxlib"} <= set(parts["machine"]["versions"])
    # cpu:0 stands in for the accelerator, cpu:1 for the host CPU.
    c = parts["calibration"]
    assert (c["descent_device"], c["ascent_device"]) == ("cpu:0", "cpu:1")
    assert str(c["ascent_batch_size"]) in c["ascent_seconds"]
    assert isinstance(c["hides"], bool) and c["transfer_seconds"] >= 0
    rows = {r["key"]: r for r in parts["step_time"]["rows"]}
    assert set(rows) == HETEROGENEOUS_ROWS
    for key, row in rows.items():
        devices = {g["batch"]: g["device"] for g in row["gradients"]}
        if key.startswith("async_sam/host"):
            assert devices == {"ascent": "cpu:1", "previous": "cpu:0"}, key
        else:
            assert set(devices.values()) == {"cpu:0"}, key
        assert row["median_step_s"] > 0 and row["ratio_vs_sgd"] > 0
        assert row["finite"], key
        assert (row["trainer_vs_pure"] is not None) == key.endswith("/trainer")
    host_sizes = {
        rows[f"async_sam/host/{k}"]["ascent_batch_size"]
        for k in ("calibrated", "b/4", "b/8")
    }
    assert {4, 2} <= host_sizes  # b/4 and b/8 of the smoke batch, 16
    assert (
        rows["async_sam/host/calibrated"]["ascent_batch_size"]
        == (c["ascent_batch_size"])
    )
    # The timeline saw the ascent finish on the host, the descent on the other.
    segments = parts["timeline"]["segments"]
    assert {(s["device"], s["label"]) for s in segments} >= {
        ("cpu:1", "ascent gradient"),
        ("cpu:0", "descent gradient"),
    }
    methods = parts["time_to_accuracy"]["methods"]
    assert set(methods) == {"sgd", "sam", "async_sam", "sampa"}
    ascent = {g["device"] for g in methods["async_sam"]["gradients"]}
    assert ascent == {"cpu:0", "cpu:1"}
    for m in methods.values():
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["curve"]
    check_sweep(parts["sweep"], parts["machine"]["sizes"])
    stem = path.stem
    for suffix in (
        ".md",
        "-step_time.png",
        "-timeline.png",
        "-accuracy_vs_time.png",
        "-sweep.png",
    ):
        assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0, suffix
    assert "| SAMPa, vmap-fused | Trainer |" in out.stdout
    assert "| width | parameters | b' | hides | AsyncSAM / SGD |" in out.stdout


def check_sweep(sweep: dict, sizes: dict) -> None:
    """Every width measured, with every field, finite and of its type."""
    rows = sweep["rows"]
    assert [r["width"] for r in rows] == sizes["widths"] + sizes["more_widths"]
    for row in rows:
        assert "skipped" not in row, row
        assert isinstance(row["parameters"], int) and row["parameters"] > 0
        for field in (
            "descent_seconds",
            "host_seconds_per_example",
            "async_sam_vs_sgd",
            "sgd_step_s",
            "async_sam_step_s",
        ):
            assert isinstance(row[field], float), field
            assert np.isfinite(row[field]) and row[field] > 0, field
        assert isinstance(row["transfer_seconds"], float)
        assert np.isfinite(row["transfer_seconds"]) and row["transfer_seconds"] >= 0
        b = row["ascent_batch_size"]
        assert isinstance(b, int) and 1 <= b <= row["batch_size"] == sizes["batch"]
        assert str(b) in row["ascent_seconds"]
        # hides False exactly when the calibration warned (even b' = 1 does not).
        assert isinstance(row["hides"], bool)
        assert row["warned_no_hiding"] is (not row["hides"])
        where = f"ascent[{b}]@cpu:1 + previous[{sizes['batch']}]@cpu:0"
        assert row["where"] == where
        assert row["finite"] is True
    counts = [r["parameters"] for r in rows]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_heterogeneous_stops_at_its_budget_and_keeps_what_it_had(tmp_path):
    status = heterogeneous.main(
        ["--smoke", "--out", str(tmp_path), "--budget-s", "0.001"]
    )
    assert status == 3
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert not record["complete"]
    assert record.get("stopped") == "budget" or record.get("skipped")
    assert (tmp_path / f"{path.stem}.md").read_text().startswith("# Heterogeneous")


def test_heterogeneous_sweep_widths_beyond_the_required_are_optional():
    parts = {p: {} for p in hetero.cli.SHARES}
    parts["sweep"] = {
        "widths": [16, 32],
        "more_widths": [128],
        "rows": [
            {"width": 16, "required": True, "parameters": 1},
            {"width": 32, "required": True, "parameters": 4},
            {"width": 128, "required": False, "skipped": "budget"},
        ],
    }
    assert hetero.cli.not_measured(parts) == []
    parts["sweep"]["rows"][1] = {"width": 32, "required": True, "skipped": "budget"}
    assert hetero.cli.not_measured(parts) == ["sweep width 32"]
    del parts["sweep"]["rows"][1:]  # stopped in the middle of width 32
    assert hetero.cli.not_measured(parts) == ["sweep width 32"]
    del parts["sweep"]
    assert hetero.cli.not_measured(parts) == ["sweep"]


def test_heterogeneous_sweep_predicts_the_next_width_from_the_last():
    # 10 s, 4 of them computing: the compilation again, the computing x4.
    assert hetero.sweep.predicted(10.0, 4.0, 4.0) == pytest.approx(22.0)
    # An estimate outside [0, took] is clipped to it.
    assert hetero.sweep.predicted(10.0, 50.0, 4.0) == pytest.approx(40.0)
    assert hetero.sweep.predicted(10.0, -1.0, 4.0) == pytest.approx(10.0)


def test_heterogeneous_rejects_a_budget_that_is_not_positive():
    with pytest.raises(SystemExit):
        heterogeneous.parse_args(["--out", "x", "--budget-s", "0"])


# --- benchmarks/frontier.py ------------------------------------------------------


def _tiny_japanese_vowels(root: pathlib.Path, n: int = 45) -> None:
    """A small stand-in for aeon's Japanese Vowels files, in the same format."""
    rng = np.random.default_rng(0)
    for split in ("TRAIN", "TEST"):
        lines = ["# made by the test", "@problemName tiny", "@data"]
        for i in range(n):
            label = i % 9 + 1
            channels = [
                ",".join(f"{v:.4f}" for v in rng.normal(label / 9, 1.0, 25))
                for _ in range(12)
            ]
            lines.append(":".join([*channels, str(label)]))
        (root / f"JapaneseVowels_eq_{split}.ts").write_text("\n".join(lines) + "\n")


def test_frontier_quick_writes_the_json_the_table_and_the_plot(tmp_path):
    jv = tmp_path / "jv"
    jv.mkdir()
    _tiny_japanese_vowels(jv)
    out = tmp_path / "out"
    record = frontier.main(["--quick", "--out", str(out), "--jv-root", str(jv)])
    assert {p.name for p in out.iterdir()} == {
        "frontier.json",
        "frontier.md",
        "frontier.png",
    }
    assert json.loads((out / "frontier.json").read_text())["labels"] == record["labels"]
    assert set(record["results"]) == {"digits", "japanese_vowels"}
    for name, by_noise in record["results"].items():
        assert set(record["cost"][name]) == set(frontier.QUICK)
        assert record["cost"][name]["sgd"] == 1.0
        for rows in by_noise.values():
            assert set(rows) == set(frontier.QUICK)
            for row in rows.values():
                assert len(row["accuracy"]) == 2
                assert 0.0 <= row["mean"] <= 1.0
    table = (out / "frontier.md").read_text()
    assert "| AsyncSAM (b/4), rho unscaled |" in table
    assert "### japanese_vowels" in table


def test_japanese_vowels_loader_reads_the_ts_files_it_is_given(tmp_path):
    from samx.examples import data

    _tiny_japanese_vowels(tmp_path, n=30)
    d = data.load_japanese_vowels(0.4, seed=1, root=tmp_path)
    assert d.x_train.shape[1] == 12 * 25 and d.x_train.dtype.name == "float32"
    assert len(d.x_train) + len(d.x_test) == 60
    assert set(d.y_test) <= set(range(9))
    flipped = (d.y_train != d.clean_train).mean()
    assert flipped == pytest.approx(0.4, abs=0.03)
    with pytest.raises(ValueError, match="no examples after an `@data` line"):
        (tmp_path / "empty.ts").write_text("@problemName x\n")
        data.read_ts(tmp_path / "empty.ts")
