"""A user's own data: unlabeled images without label files (every layout), multi-channel images, and the start-up
errors of both, raised before the first training step."""

import gzip
import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from rcps_train import engine
from rcps_train.cli import main
from rcps_train.config import load_config
from rcps_train.data import dataset_splits, load_case
from rcps_train.layouts import DataError, list_cases
from rcps_train.synthetic import UNLABELED_FOLDERS, make_synthetic_dataset
from tests.trainer.tiny_data import SHAPE, tiny_overrides

LAYOUTS = ("nifti", "nnunet", "h5")


def own_dataset(root, layout="nifti", channels=1, num_unlabeled=2):
    """3 labeled training cases, 1 test case and ``num_unlabeled`` images without labels."""
    return make_synthetic_dataset(root, 3, 1, SHAPE, 0, layout, channels, num_unlabeled)


def own_config(data_root, out_dir, layout="nifti", **extra):
    """``data.labeled = "all"``: every training case labeled, the unlabeled pool is the unlabeled folder."""
    values = {
        "data.format": f'"{layout}"',
        "data.labeled": '"all"',
        "data.unlabeled_dir": f'"{UNLABELED_FOLDERS[layout]}"',
        "data.val_cases": 1,
        "train.epochs": 1,
        **extra,
    }
    return load_config(None, tiny_overrides(data_root, out_dir, **values))


def capture_runs(monkeypatch):
    """Record every TrainingRun that ``engine.train`` sets up."""
    runs, real = [], engine.set_up_run

    def recording(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(engine, "set_up_run", recording)
    return runs


def first_step_terms(run_dir):
    import csv

    with open(run_dir / "train_log.csv", newline="") as f:
        row = next(csv.DictReader(f))
    return {key: float(row[key]) for key in ("seg", "bc_u", "urp_u", "cr_u")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unlabeled_images_without_labels_are_read_and_trained_on(tmp_path, monkeypatch, layout):
    root = own_dataset(tmp_path / "data", layout)
    folder = root / UNLABELED_FOLDERS[layout]
    assert not list(root.rglob("unl_*label*")) and not list(folder.glob("*label*"))
    if layout == "h5":
        with h5py.File(folder / "unl_000.h5") as f:
            assert "label" not in f
    runs = capture_runs(monkeypatch)
    result = engine.train(own_config(root, tmp_path, layout))
    run = runs[0]
    assert [c.name for c in run.splits.unlabeled] == ["unl_000", "unl_001"]
    assert all(c.label is None and c.image.parent == folder for c in run.splits.unlabeled)
    # labeled = "all" with val_cases = 1: the last training case is held out of the labeled ones for validation.
    assert [c.name for c in run.splits.labeled] == ["case_000", "case_001"]
    assert [c.name for c in run.splits.validation] == ["case_002"]
    assert result["dice"] >= 0 and (tmp_path / "rcps" / "best.pt").exists()
    assert all(np.isfinite(v) and v > 0 for v in first_step_terms(tmp_path / "rcps").values())


def test_the_unlabeled_images_drive_the_unsupervised_terms(tmp_path):
    """Same seeds and labeled data, other unlabeled images: the unsupervised terms of step 1 change."""
    first = own_dataset(tmp_path / "a")
    second = tmp_path / "b"
    shutil.copytree(first, second)
    for path in (second / UNLABELED_FOLDERS["nifti"]).iterdir():
        image = nib.load(path)
        noise = np.random.default_rng(5).standard_normal(image.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noise, image.affine), path)
    terms = []
    for data, name in ((first, "a"), (second, "b")):
        engine.train(own_config(data, tmp_path, **{"run.name": f'"{name}"', "eval.every_epochs": 0}))
        terms.append(first_step_terms(tmp_path / name))
    for key in ("bc_u", "urp_u", "cr_u"):
        assert terms[0][key] != terms[1][key], key


def _never_train(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a training step ran before the bad input was reported")

    monkeypatch.setattr(engine, "train_step", fail)


def _truncate(path):
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:400]))


def _write_nan(path):
    image = nib.load(path)
    array = image.get_fdata(dtype=np.float32)
    array[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(array, image.affine), path)


def _two_channels(path):
    image = nib.load(path)
    array = image.get_fdata(dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([array, array], -1), image.affine), path)


def _flat(path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1, 1, 2), np.float32), np.eye(4)), path)


BAD_INPUTS = {
    "missing folder": (lambda root: shutil.rmtree(root / "unlabeled_images"), r"unlabeled_images does not exist"),
    "empty folder": (
        lambda root: [p.unlink() for p in (root / "unlabeled_images").iterdir()],
        r"unlabeled_images holds no unlabeled images .*<case>\.nii\.gz",
    ),
    "case also labeled": (
        lambda root: shutil.copy(root / "train_images" / "case_001.nii.gz", root / "unlabeled_images"),
        r"also training or test cases .*\['case_001'\]",
    ),
    "test case as unlabeled": (
        lambda root: shutil.copy(root / "val_images" / "test_000.nii.gz", root / "unlabeled_images"),
        r"also training or test cases .*\['test_000'\]",
    ),
    "truncated file": (lambda root: _truncate(root / "unlabeled_images" / "unl_001.nii.gz"), r"cannot read .*unl_001"),
    "NaN": (lambda root: _write_nan(root / "unlabeled_images" / "unl_000.nii.gz"), r"unl_000.* NaN"),
    "channel count": (
        lambda root: _two_channels(root / "unlabeled_images" / "unl_001.nii.gz"),
        r"unl_001.*2 channel\(s\) but .*case_000.* has 1",
    ),
    "not 3D": (lambda root: _flat(root / "unlabeled_images" / "unl_000.nii.gz"), r"unl_000.*expected a 3D volume"),
}


@pytest.mark.parametrize("defect", list(BAD_INPUTS))
def test_bad_unlabeled_input_stops_the_run_before_step_1(tmp_path, monkeypatch, defect):
    root = own_dataset(tmp_path / "data")
    edit, message = BAD_INPUTS[defect]
    edit(root)
    _never_train(monkeypatch)
    # What an earlier attempt left in the run folder stays there: nothing is removed before the inputs are checked.
    earlier = tmp_path / "rcps"
    earlier.mkdir()
    for name in ("config.toml", "train_log.csv", "val_log.csv"):  # a killed attempt's (a finished run is refused)
        (earlier / name).write_text("earlier")
    with pytest.raises(DataError, match=message):
        engine.train(own_config(root, tmp_path))
    assert sorted(p.name for p in earlier.iterdir()) == ["config.toml", "train_log.csv", "val_log.csv"]


def test_labeled_all_needs_an_unlabeled_folder_and_a_training_case(tmp_path):
    root = own_dataset(tmp_path / "data", num_unlabeled=0)
    config = own_config(root, tmp_path, **{"data.unlabeled_dir": '""'})
    with pytest.raises(DataError, match=r"data.labeled = 'all' leaves no unlabeled images: set data.unlabeled_dir"):
        dataset_splits(config["data"])
    config = own_config(own_dataset(tmp_path / "d2"), tmp_path, **{"data.val_cases": 3})
    with pytest.raises(DataError, match="holds out all 3 labeled training cases"):
        dataset_splits(config["data"])
    # The benchmark protocol with the folder added: hidden-label cases and unlabeled images form the pool.
    config = own_config(own_dataset(tmp_path / "d3"), tmp_path, **{"data.labeled": 1})
    splits = dataset_splits(config["data"])
    assert [c.name for c in splits.unlabeled] == ["case_001", "unl_000", "unl_001"]
    assert [c.name for c in splits.validation] == ["case_002"]
    # An absolute folder works as well as one under data.root.
    folder = root.parent / "d3" / "unlabeled_images"
    absolute = own_config(root.parent / "d3", tmp_path, **{"data.unlabeled_dir": f'"{folder}"'})
    assert len(dataset_splits(absolute["data"]).unlabeled) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_multichannel_images_load_channels_first_in_every_layout(tmp_path, layout):
    root = own_dataset(tmp_path / layout, layout, channels=2, num_unlabeled=1)
    one_channel = own_dataset(tmp_path / f"{layout}-1", layout, channels=1, num_unlabeled=0)
    case = list_cases(root, "train", layout)[0]
    image, label = load_case(case, 2, channels=2)
    assert image.shape == (2, *SHAPE) and label.shape == SHAPE
    # Channel 0 is the single-channel dataset's image, and each channel is z-scored on its own.
    single, _ = load_case(list_cases(one_channel, "train", layout)[0], 2)
    np.testing.assert_array_equal(image[:1], single)
    np.testing.assert_allclose(image.reshape(2, -1).std(1), 1, atol=1e-3)
    assert not np.allclose(image[0], image[1])
    with pytest.raises(DataError, match=r"has 2 channel\(s\); expected 1"):
        load_case(case, 2, channels=1)
    config = own_config(root, tmp_path, layout, **{"data.labeled": 1})
    assert dataset_splits(config["data"]).channels == 2


def test_nnunet_missing_channel_file_is_named(tmp_path):
    root = own_dataset(tmp_path / "nn", "nnunet", channels=2)
    moved = tmp_path / "moved.nii.gz"
    (root / "imagesTr" / "case_001_0001.nii.gz").rename(moved)
    with pytest.raises(DataError, match=r"channel file .*case_001_0001\.nii\.gz .*dataset\.json lists 2 channels"):
        list_cases(root, "train", "nnunet")
    moved.rename(root / "imagesTr" / "case_001_0001.nii.gz")
    (root / "imagesUnlabeled" / "unl_000_0001.nii.gz").unlink()
    config = own_config(root, tmp_path, "nnunet", **{"data.labeled": 1})
    with pytest.raises(DataError, match=r"unl_000_0001"):
        dataset_splits(config["data"])


def test_two_channel_nnunet_run_records_its_channels_and_refuses_one_channel_data(tmp_path, capsys):
    root = own_dataset(tmp_path / "nn2", "nnunet", channels=2)
    assert json.loads((root / "dataset.json").read_text())["channel_names"] == {"0": "synthetic0", "1": "synthetic1"}
    result = engine.train(own_config(root, tmp_path, "nnunet"))
    assert set(result) >= {"dice", "hd95", "asd"}
    run_dir = tmp_path / "rcps"
    for name in ("checkpoint.pt", "best.pt"):
        state = torch.load(run_dir / name, weights_only=False)
        assert state["in_channels"] == 2 and state["model"]["encoder.0.conv1.weight"].shape[1] == 2
    assert main(["eval", "--checkpoint", str(run_dir / "best.pt"), "--out", str(tmp_path / "rescore")]) == 0
    one_channel = own_dataset(tmp_path / "nn1", "nnunet", channels=1)
    code = main(["eval", "--checkpoint", str(run_dir / "best.pt"), "--data", str(one_channel)])
    assert code == 2
    assert "trained on 2-channel images but the val images under" in capsys.readouterr().err
