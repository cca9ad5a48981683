"""Nothing a user may want is deleted or overwritten: finished run folders, re-scores, comparisons killed while
writing; a run remembers its data; output folders are checked before any work."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from rcps_train import engine, files
from rcps_train.cli import main
from rcps_train.compare import run_comparison
from rcps_train.config import ConfigError, load_config
from rcps_train.synthetic import make_synthetic_dataset
from tests.trainer.tiny_data import die_at_step, tiny_dataset, tiny_overrides

SHORT = {"train.epochs": 1, "train.max_steps_per_epoch": 1, "eval.every_epochs": 1, "data.patch_size": "[32, 32, 16]"}


def _config(data, out, name="run", **extra):
    return load_config(None, tiny_overrides(data, out, **{"run.name": f'"{name}"', **SHORT, **extra}))


def test_a_finished_run_without_its_checkpoint_is_never_cleared_implicitly(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    engine.train(_config(data, tmp_path))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint.pt").unlink()  # removed to save space
    kept = {name: (run_dir / name).read_bytes() for name in ("best.pt", "metrics.json", "metrics.csv")}
    typo = _config(tmp_path / "dta", tmp_path)  # a typo in data.root
    with pytest.raises(ConfigError, match=r"holds best.pt, metrics.json, metrics.csv.* --overwrite"):
        engine.train(typo)
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    # The CLI says the same without a traceback, and --overwrite replaces the run once the inputs check out.
    args = ["train", "--config", str(tmp_path / "run" / "config.toml")]
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 0
    assert (run_dir / "checkpoint.pt").exists()  # trained anew (the same seed gives the same numbers again)


def test_rescores_get_a_folder_each_and_record_what_they_scored(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    engine.train(_config(data, tmp_path))
    run_dir = tmp_path / "run"
    run_metrics = (run_dir / "metrics.json").read_text()
    for name in ("best.pt", "checkpoint.pt"):
        assert main(["eval", "--checkpoint", str(run_dir / name)]) == 0
    assert main(["eval", "--checkpoint", str(run_dir / "best.pt"), "--largest-component", "on"]) == 0
    folders = sorted(run_dir.glob("eval-*"))
    assert [f.name.rsplit("-", 1)[0] for f in folders] == [
        "eval-best-rcps-val-lcc-off",
        "eval-best-rcps-val-lcc-on",
        "eval-checkpoint-rcps-val-lcc-off",
    ]
    record = json.loads((folders[0] / "metrics.json").read_text())
    assert record["checkpoint"] == str((run_dir / "best.pt").resolve()) and record["checkpoint_epoch"] == 1
    assert (record["split"], record["data_root"], record["protocol"]) == ("val", str(data), "rcps")
    assert (run_dir / "metrics.json").read_text() == run_metrics
    # An explicit --out holding another scoring is refused; the same scoring again is allowed.
    out = ["--out", str(folders[0])]
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoint.pt"), *out]) == 2
    assert "differing in checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir / "best.pt"), *out]) == 0


def test_resume_refuses_data_that_changed(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    config = _config(data, tmp_path, **{"train.epochs": 2, "train.checkpoint_every": 1})
    real_step = die_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        engine.train(config)
    monkeypatch.setattr(engine, "train_step", real_step)
    image = nib.load(data / "train_images" / "case_003.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::2], image.affine), data / "train_images" / "case_004.nii.gz")
    nib.save(
        nib.Nifti1Image(np.zeros(image.shape[:3], np.uint8)[::2], image.affine),
        data / "train_labels" / "case_004.nii.gz",
    )
    with pytest.raises(
        ConfigError, match=r"changed since .*validation cases: added \['case_004'\], removed \['case_003'\]"
    ):
        engine.train(config, resume=True)
    for folder in ("train_images", "train_labels"):
        (data / folder / "case_004.nii.gz").unlink()
    label = data / "train_labels" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), label)
    with pytest.raises(ConfigError, match=r"files changed size: \['unlabeled/case_001'\]"):
        engine.train(config, resume=True)


def _compare(config, data, out):
    overrides = tiny_overrides(data, out, **SHORT)
    return run_comparison(config, ["supervised"], [0, 1], overrides, out)


def test_compare_killed_while_writing_metrics_reruns_to_the_same_table(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    config_file = tmp_path / "c.toml"
    config_file.write_text("")
    first = (_compare(config_file, data, tmp_path / "a") / "comparison.csv").read_text()
    real_replace, calls = os.replace, []

    def dying_replace(source, target):  # a kill between writing metrics.json's bytes and its rename
        if str(target).endswith("metrics.json") and not calls:
            calls.append(target)
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _compare(config_file, data, tmp_path / "b")
    monkeypatch.setattr(files.os, "replace", real_replace)
    (tmp_path / "b" / "supervised-seed1").mkdir()
    # An older writer's torn file reads as not written, not as a crash.
    (tmp_path / "b" / "supervised-seed1" / "metrics.json").write_text('{"checkpoint": "checkp')
    again = (_compare(config_file, data, tmp_path / "b") / "comparison.csv").read_text()

    def metric_rows(text):
        return [{k: v for k, v in row.items() if k != "minutes"} for row in csv.DictReader(text.splitlines())]

    assert metric_rows(again) == metric_rows(first)


def test_compare_checks_every_run_before_the_first(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    config_file = tmp_path / "c.toml"
    config_file.write_text("")
    overrides = tiny_overrides(data, tmp_path, **SHORT)
    with pytest.raises(ConfigError, match="--seeds lists 0 more than once"):
        run_comparison(config_file, ["rcps"], [0, 0], overrides, tmp_path / "o")
    with pytest.raises(ConfigError, match="--methods lists rcps more than once"):
        run_comparison(config_file, ["rcps", "rcps"], [0], overrides, tmp_path / "o")
    with pytest.raises(ConfigError, match=r"train.method.*'nope'"):  # the second method, before the first trains
        run_comparison(config_file, ["supervised", "nope"], [0], overrides, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # A finished run trained on other data is not reused.
    run_comparison(config_file, ["supervised"], [0], overrides, tmp_path / "o")
    make_synthetic_dataset(data, 4, 2, (32, 32, 20), seed=1, overwrite=True)
    with pytest.raises(ConfigError, match=r"supervised-seed0 was trained on other data \(files changed size"):
        run_comparison(config_file, ["supervised"], [0], overrides, tmp_path / "o")


def test_output_folders_are_checked_before_any_work(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"run folder .*a_file/run: .*a_file is a file"):
        engine.train(_config(data, blocker))
    assert main(["make-synthetic", "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["make-synthetic", "--out", str(data)]) == 2  # would mix two datasets
    assert "not empty" in capsys.readouterr().err
    assert (
        main(
            [
                "make-synthetic",
                "--out",
                str(data),
                "--train",
                "3",
                "--val",
                "1",
                "--shape",
                "8",
                "8",
                "8",
                "--overwrite",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (data / "train_images").iterdir()) == [
        "case_000.nii.gz",
        "case_001.nii.gz",
        "case_002.nii.gz",
    ]
    checkpoint_file = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "config": {}}, checkpoint_file)
    assert main(["eval", "--checkpoint", str(checkpoint_file), "--out", str(blocker)]) == 2
    assert "--out" in capsys.readouterr().err
