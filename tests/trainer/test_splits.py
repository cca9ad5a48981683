"""Whole runs: every split checked before step 1, honest model selection (validation split, best.pt, the test
split scored once at the end), and an nnU-Net raw dataset from make-synthetic trained and evaluated."""

import builtins
import csv
import gzip
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from rcps_train import engine
from rcps_train.cli import main
from rcps_train.config import load_config
from rcps_train.data import dataset_splits
from rcps_train.layouts import DataError
from rcps_train.synthetic import make_synthetic_dataset
from tests.trainer.tiny_data import SHAPE, tiny_overrides


def _write_label(case, label):
    if case.label.suffix == ".h5":
        with h5py.File(case.label, "r+") as f:
            del f["label"]
            f["label"] = label
    else:
        nib.save(nib.Nifti1Image(label, np.eye(4)), case.label)


def _label_of_five(case):
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 5
    _write_label(case, label)


def _drop_h5_label(case):
    with h5py.File(case.image, "r+") as f:
        del f["label"]


def _truncate_image(case):
    case.image.write_bytes(gzip.compress(gzip.decompress(case.image.read_bytes())[:400]))


DEFECTS = {
    "label 5": _label_of_five,
    "shape": lambda case: _write_label(case, np.zeros((8, 8, 8), np.uint8)),
    "h5 without label": _drop_h5_label,
    "corrupt": _truncate_image,
}


@pytest.mark.parametrize(
    "data_format, split, defect",
    [
        ("nifti", "test", "label 5"),
        ("nifti", "validation", "shape"),
        ("nifti", "validation", "corrupt"),
        ("h5", "test", "h5 without label"),
        ("h5", "validation", "label 5"),
        ("nnunet", "test", "corrupt"),
        ("nnunet", "validation", "label 5"),
        ("nnunet", "test", "shape"),
    ],
)
def test_bad_validation_or_test_file_stops_the_run_before_step_one(tmp_path, monkeypatch, data_format, split, defect):
    root = make_synthetic_dataset(tmp_path / "data", 4, 2, SHAPE, seed=0, layout=data_format)
    config = load_config(None, tiny_overrides(root, tmp_path, **{"data.format": f'"{data_format}"'}))
    bad = getattr(dataset_splits(config["data"]), split)[-1]
    DEFECTS[defect](bad)
    steps = []
    monkeypatch.setattr(engine, "train_step", lambda *args, **kwargs: steps.append(1))
    with pytest.raises(DataError, match=bad.label.name if defect in ("label 5", "shape") else bad.image.name):
        engine.train(config)
    assert not steps


def test_validation_split_picks_best_and_the_test_split_is_read_only_at_start_and_end(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "data", 4, 2, SHAPE, seed=0)
    config = load_config(None, tiny_overrides(root, tmp_path, **{"run.name": '"honest"', "train.epochs": 3}))
    test_folders = {root / "val_images", root / "val_labels"}
    steps, opened, scored = [], [], []
    real_step, real_open, real_evaluate = engine.train_step, builtins.open, engine.evaluate_cases

    def counting_step(*args, **kwargs):
        steps.append(1)
        return real_step(*args, **kwargs)

    def recording_open(file, *args, **kwargs):  # every file read, whoever reads it (nibabel, h5py's path, csv)
        if isinstance(file, (str, Path)) and Path(file).parent in test_folders:
            opened.append((Path(file).name, len(steps)))
        return real_open(file, *args, **kwargs)

    def recording_evaluate(model, cases, *args, **kwargs):
        scored.append(([c.image.parent.name for c in cases], len(steps)))
        return real_evaluate(model, cases, *args, **kwargs)

    monkeypatch.setattr(engine, "train_step", counting_step)
    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(engine, "evaluate_cases", recording_evaluate)
    result = engine.train(config)
    monkeypatch.setattr(builtins, "open", real_open)
    total = len(steps)
    assert total == 6
    # The test files: read before step 1 (the start-up check), then only after the last step.
    assert {at for _, at in opened} == {0, total}
    assert (
        {name for name, at in opened if at == 0}
        == {name for name, at in opened if at == total}
        == {"test_000.nii.gz", "test_001.nii.gz"}
    )
    # Scoring: the validation split after every epoch, the test split only after training, once per checkpoint.
    assert [(folders[0], at) for folders, at in scored] == [
        ("train_images", 2),
        ("train_images", 4),
        ("train_images", 6),
        ("val_images", 6),
        ("val_images", 6),
    ]
    run_dir = tmp_path / "honest"
    with open(run_dir / "val_log.csv", newline="") as f:
        val = [(int(r["epoch"]), float(r["dice"])) for r in csv.DictReader(f)]
    assert [epoch for epoch, _ in val] == [1, 2, 3]
    best_epoch, best_dice = max(val, key=lambda row: row[1])  # the first of equal maxima
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint"] == "checkpoint.pt" and metrics["epoch"] == 3
    assert metrics["best"]["checkpoint"] == "best.pt" and metrics["best"]["epoch"] == best_epoch
    assert metrics["best"]["val_dice"] == pytest.approx(best_dice)
    assert len(metrics["per_case"]) == len(metrics["best"]["per_case"]) == 2
    assert result["best"]["epoch"] == best_epoch and result["dice"] == metrics["dice"]
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "best.pt").exists()
    assert (run_dir / "metrics_best.csv").exists()


def test_nnunet_dataset_from_make_synthetic_trains_and_evaluates(tmp_path, capsys):
    root = tmp_path / "Dataset001_Synthetic"
    assert (
        main(
            [
                "make-synthetic",
                "--out",
                str(root),
                "--layout",
                "nnunet",
                "--train",
                "4",
                "--val",
                "2",
                "--shape",
                *map(str, SHAPE),
            ]
        )
        == 0
    )
    sets = [
        item
        for pair in (
            ("--set", o)
            for o in tiny_overrides(
                root,
                tmp_path,
                **{"data.format": '"nnunet"', "run.name": '"nn"', "train.epochs": 1, "data.patch_size": "[32, 32, 16]"},
            )
        )
        for item in pair
    ]
    assert main(["train", "--config", "demo", *sets]) == 0
    metrics = json.loads((tmp_path / "nn" / "metrics.json").read_text())
    assert [row["case"] for row in metrics["per_case"]] == ["test_000", "test_001"]
    assert metrics["best"]["epoch"] == 1 and 0.0 <= metrics["dice"] <= 1.0
    assert main(["eval", "--checkpoint", str(tmp_path / "nn" / "best.pt"), "--out", str(tmp_path / "ev")]) == 0
    rescored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rescored["dice"] == pytest.approx(metrics["best"]["dice"])
