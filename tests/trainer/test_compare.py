"""`rcps-train compare`: every method x seed trained, the table (per-seed rows, mean +- std) and the plot."""

import csv
import statistics

from rcps_train.cli import main
from tests.trainer.tiny_data import tiny_dataset, tiny_overrides


def test_compare_writes_table_and_plot_and_reuses_finished_runs(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    sets = [
        item
        for pair in (
            ("--set", o)
            for o in tiny_overrides(
                data, tmp_path, **{"train.epochs": 2, "train.max_steps_per_epoch": 1, "data.patch_size": "[32, 32, 16]"}
            )
        )
        for item in pair
    ]
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--config",
        "demo",
        "--methods",
        "rcps",
        "supervised",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        *sets,
    ]
    assert main(argv) == 0
    for name in ("comparison.csv", "comparison.md", "val_dice.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_seed = [r for r in rows if r["seed"] in ("0", "1")]
    # 2 methods x 2 seeds x 2 checkpoints (the last weights and best.pt), each scored on the test split.
    assert sorted((r["method"], r["seed"], r["checkpoint"]) for r in per_seed) == sorted(
        (m, s, c) for m in ("rcps", "supervised") for s in ("0", "1") for c in ("checkpoint.pt", "best.pt")
    )
    for method in ("rcps", "supervised"):
        dice = [float(r["dice"]) for r in per_seed if r["method"] == method and r["checkpoint"] == "checkpoint.pt"]
        mean, std = (
            [r for r in rows if r["seed"] == stat and r["method"] == method and r["checkpoint"] == "checkpoint.pt"][0]
            for stat in ("mean", "std")
        )
        assert float(mean["dice"]) == statistics.mean(dice) and float(std["dice"]) == statistics.stdev(dice)
    markdown = (out / "comparison.md").read_text()
    assert "| rcps | checkpoint.pt | 2 |" in markdown and "+-" in markdown
    # The seeds train different weights; the runs' folders are kept.
    assert {p.name for p in out.iterdir() if p.is_dir()} == {
        "rcps-seed0",
        "rcps-seed1",
        "supervised-seed0",
        "supervised-seed1",
    }
    # A second call reuses the finished runs (nothing retrained) and writes the same per-seed numbers.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    assert main(argv) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    with open(out / "comparison.csv", newline="") as f:
        assert [r["dice"] for r in csv.DictReader(f)][:8] == [r["dice"] for r in rows][:8]
    # Another config in the same folder is refused instead of mixing runs.
    capsys.readouterr()
    assert main([*argv, "--set", "loss.beta=0.2"]) == 2
    assert "holds a run of another config" in capsys.readouterr().err
