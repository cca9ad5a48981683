"""Start-up checks of a dataset that used to pass silently: ID lists, case names across splits, counts, and the
grid of an image and its label. Each raises a DataError naming the file or key before any training step."""

import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from rcps_train import engine
from rcps_train.config import load_config
from rcps_train.data import dataset_splits, load_case
from rcps_train.layouts import DataError, list_cases
from rcps_train.synthetic import make_synthetic_dataset
from tests.trainer.tiny_data import SHAPE, tiny_overrides


@pytest.fixture
def root(tmp_path):
    return make_synthetic_dataset(tmp_path / "data", 4, 2, SHAPE, seed=0)


def _splits(root, tmp_path, **extra):
    return dataset_splits(load_config(None, tiny_overrides(root, tmp_path, **extra))["data"])


def _resave(path, affine):
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)


@pytest.mark.parametrize(
    "ids, message",
    [("", r"data.labeled: ID file .*ids.txt is empty"), ("case_001\ncase_002\ncase_001\n", r"\['case_001'\] more")],
)
def test_id_files_must_list_each_case_once(root, tmp_path, ids, message):
    path = tmp_path / "ids.txt"
    path.write_text(ids)
    with pytest.raises(DataError, match=message):
        _splits(root, tmp_path, **{"data.labeled": f'"{path}"'})


def test_h5_list_with_a_case_twice_is_refused(tmp_path):
    root = make_synthetic_dataset(tmp_path / "h5", 3, 1, SHAPE, seed=0, layout="h5")
    (root / "train.list").write_text("case_000\ncase_001\ncase_000\n")
    with pytest.raises(DataError, match=r"train.list lists \['case_000'\] more than once"):
        list_cases(root, "train", "h5")


def test_counts_beyond_the_cases_are_refused(root, tmp_path):
    with pytest.raises(DataError, match="data.labeled = 5 asks for more cases than the 4 training cases"):
        _splits(root, tmp_path, **{"data.labeled": 5})
    with pytest.raises(DataError, match="data.val_cases = 4 asks for more cases than the 3 unlabeled"):
        _splits(root, tmp_path, **{"data.val_cases": 4})


def test_a_case_in_the_training_and_the_test_split_is_leakage(root, tmp_path):
    for kind in ("images", "labels"):
        shutil.copy(root / f"train_{kind}" / "case_002.nii.gz", root / f"val_{kind}" / "case_002.nii.gz")
    with pytest.raises(DataError, match=r"\['case_002'\] are both training and test cases .*leakage"):
        _splits(root, tmp_path)


def test_names_that_differ_only_in_letter_case_are_refused(root, tmp_path):
    for kind in ("images", "labels"):
        shutil.copy(root / f"train_{kind}" / "case_002.nii.gz", root / f"train_{kind}" / "CASE_002.nii.gz")
    with pytest.raises(DataError, match=r"case names \['CASE_002', 'case_002'\] differ only in letter case"):
        _splits(root, tmp_path)


@pytest.mark.parametrize(
    "affine, message",
    [
        (np.diag([1.0, 1.0, 2.5, 1.0]), r"case_001.nii.gz has voxel spacing \[1.0, 1.0, 2.5\] but image"),
        (np.diag([-1.0, 1.0, 1.0, 1.0]), r"case_001.nii.gz has orientation .* but image"),
        (np.diag([1.0004, 1.0, 1.0, 1.0]), None),  # within the tolerance: a converter's rounding
    ],
)
def test_label_must_share_the_image_grid(root, affine, message):
    case = list_cases(root, "train", "nifti")[1]
    _resave(case.label, affine)
    if message is None:
        load_case(case, 2)
        return
    with pytest.raises(DataError, match=message) as error:
        load_case(case, 2)
    assert "train_labels" in str(error.value)


def test_a_channel_file_off_the_grid_stops_the_run_before_step_1(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "nn", 4, 2, SHAPE, seed=0, layout="nnunet", channels=2)
    _resave(root / "imagesTs" / "test_001_0001.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0]))
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: pytest.fail("a step ran"))
    config = load_config(None, tiny_overrides(root, tmp_path, **{"data.format": '"nnunet"'}))
    with pytest.raises(DataError, match=r"test_001_0001.nii.gz has voxel spacing \[2.0, 2.0, 2.0\]"):
        engine.train(config)


def test_spacing_of_every_scored_file_is_checked_before_step_1(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "h5", 4, 2, SHAPE, seed=0, layout="h5")
    with h5py.File(root / "test_001.h5", "r+") as f:  # one test case in mm, the other in voxels
        f.attrs["spacing"] = [1.0, 1.0, 2.0]
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: pytest.fail("a step ran"))
    config = load_config(None, tiny_overrides(root, tmp_path, **{"data.format": '"h5"'}))
    with pytest.raises(DataError, match=r"cases \['test_000'\] have no voxel spacing while others have one"):
        engine.train(config)
    with h5py.File(root / "test_001.h5", "r+") as f:
        f.attrs["spacing"] = [1.0, -1.0, 2.0]
    with pytest.raises(DataError, match=r"test_001.h5: attribute 'spacing' must be 3 positive numbers"):
        engine.train(config)
