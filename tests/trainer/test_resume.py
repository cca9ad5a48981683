"""Whole runs on tiny data: run folder contents, resume after an interrupted run, run-folder bookkeeping, and the
eval command."""

import csv
import json

import pytest
import torch

from rcps_train import engine
from rcps_train.cli import main
from rcps_train.config import ConfigError, load_config
from rcps_train.model import build_model
from tests.trainer.tiny_data import die_at_step, tiny_dataset, tiny_overrides


def _config(data_root, out_dir, name, **extra):
    return load_config(None, tiny_overrides(data_root, out_dir, **{"run.name": f'"{name}"', **extra}))


def _log(run_dir):
    with open(run_dir / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    summary = engine.train(_config(data, tmp_path, "full", **{"train.checkpoint_every": 2}))
    full_dir = tmp_path / "full"
    assert set(summary) >= {"dice", "hd95", "asd"}
    for name in (
        "config.toml",
        "train_log.csv",
        "val_log.csv",
        "checkpoint.pt",
        "best.pt",
        "metrics.csv",
        "metrics_best.csv",
        "metrics.json",
        "loss_terms.png",
        "val_dice.png",
    ):
        assert (full_dir / name).exists(), name
    rows = _log(full_dir)
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r[k]) > 0 for r in rows for k in ("bc_l", "urp_u", "cr_l", "step_time_s", "peak_mem_mb"))
    assert float(rows[0]["lr"]) == pytest.approx(1e-4) and float(rows[2]["lr"]) == pytest.approx(0.01)
    metrics = json.loads((full_dir / "metrics.json").read_text())
    assert {"dice", "hd95", "asd", "per_case"} <= set(metrics) and len(metrics["per_case"]) == 2

    # Kill the second run during its 4th step: the last checkpoint is at step 2, the log has 3 rows.
    real_step = die_at_step(monkeypatch, 4)
    config = _config(data, tmp_path, "killed", **{"train.checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        engine.train(config)
    killed_dir = tmp_path / "killed"
    assert len(_log(killed_dir)) == 3
    assert torch.load(killed_dir / "checkpoint.pt", weights_only=False)["global_step"] == 2
    monkeypatch.setattr(engine, "train_step", real_step)
    with pytest.raises(ConfigError, match="--resume"):
        engine.train(config)
    # A kill while a row was being written leaves a torn last line (here: the global_step field is missing).
    with open(killed_dir / "train_log.csv", "a") as f:
        f.write("1,2")
    engine.train(config, resume=True)

    resumed_rows = _log(killed_dir)
    assert [r["global_step"] for r in resumed_rows] == [r["global_step"] for r in rows]
    for a, b in zip(rows, resumed_rows):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    final_full = torch.load(full_dir / "checkpoint.pt", weights_only=False)["model"]
    final_resumed = torch.load(killed_dir / "checkpoint.pt", weights_only=False)["model"]
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=1e-5, atol=1e-6, msg=key)
    # And the run did train: the weights moved away from the initial ones.
    assert not torch.equal(final_full["heads.3.weight"], build_model(config, 1).state_dict()["heads.3.weight"])

    # --resume of a finished run re-scores the test split and adds no row to either log.
    val_before = (killed_dir / "val_log.csv").read_text()
    again = engine.train(config, resume=True)
    assert (killed_dir / "val_log.csv").read_text() == val_before and len(val_before.splitlines()) == 3
    assert [r["global_step"] for r in _log(killed_dir)] == [r["global_step"] for r in rows]
    assert again["dice"] == pytest.approx(json.loads((full_dir / "metrics.json").read_text())["dice"])


def test_fresh_run_after_a_kill_before_the_first_checkpoint_starts_clean(tmp_path, monkeypatch, capsys):
    data = tiny_dataset(tmp_path / "data")
    config = _config(data, tmp_path, "early", **{"train.checkpoint_every": 100})
    real_step = die_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        engine.train(config)
    run_dir = tmp_path / "early"
    assert len(_log(run_dir)) == 1 and not (run_dir / "checkpoint.pt").exists()
    monkeypatch.setattr(engine, "train_step", real_step)
    engine.train(config)  # no checkpoint, so no --resume: the same name starts again from step 1
    assert [int(r["global_step"]) for r in _log(run_dir)] == [1, 2, 3, 4]
    assert "removed the files of an earlier attempt: config.toml, train_log.csv" in capsys.readouterr().out


def test_eval_command_writes_metrics(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    config = _config(
        data,
        tmp_path,
        "run",
        **{
            "train.epochs": 1,
            "train.max_steps_per_epoch": 1,
            "train.method": '"supervised"',
            "eval.every_epochs": 0,
            # batch 1 alone: the deepest level needs > 1 voxel for BatchNorm
            "data.patch_size": "[32, 32, 16]",
        },
    )
    engine.train(config)
    out = tmp_path / "eval_out"
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(data), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "mean" in printed and "test_001" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["case"] for row in metrics["per_case"]] == ["test_000", "test_001"]
    assert 0.0 <= metrics["dice"] <= 1.0
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_demo_command_end_to_end(tmp_path, capsys):
    # The README's main-job command, shortened to one step: data, training, evaluation and the table.
    (tmp_path / "synthetic_data.partial").mkdir()  # what a demo killed while writing its data leaves
    (tmp_path / "synthetic_data.partial" / "dataset.json").write_text("{")
    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path),
                "--set",
                "train.epochs=1",
                "--set",
                "train.max_steps_per_epoch=1",
                "--set",
                "train.progress=false",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Dice" in printed and "HD95" in printed and "ASD" in printed and "mean" in printed
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("demo-")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["per_case"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("synthetic")) == ["synthetic_data"]


@pytest.mark.parametrize("rampup_epochs", [0, 1])
def test_rampup_epochs_sets_the_ramp_length(tmp_path, rampup_epochs):
    # 0 (the default) ramps over the whole run, as the paper does; a shorter ramp reaches 1 earlier.
    from rcps_train.losses import ramp_weight

    data = tiny_dataset(tmp_path / "data")
    engine.train(
        _config(
            data,
            tmp_path,
            "ramp",
            **{
                "train.epochs": 3,
                "train.max_steps_per_epoch": 1,
                "eval.every_epochs": 0,
                "train.rampup_epochs": rampup_epochs,
            },
        )
    )
    ramps = [float(r["ramp"]) for r in _log(tmp_path / "ramp")]
    assert ramps == pytest.approx([ramp_weight(epoch, rampup_epochs or 3) for epoch in range(3)])
    assert (ramps[1] == pytest.approx(1.0)) == (rampup_epochs == 1)
