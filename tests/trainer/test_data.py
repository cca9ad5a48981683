"""Data loading: NIfTI, h5 and nnU-Net layouts, the labeled and validation subsets, start-up errors, crops and the
epoch plan."""

import gzip
import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from rcps_train.augment import random_crop, random_grid_distortion
from rcps_train.config import load_config
from rcps_train.data import (
    PairedPatchDataset,
    VolumeStore,
    dataset_splits,
    epoch_plan,
    load_case,
    split_labeled,
    split_validation,
)
from rcps_train.layouts import DataError, list_cases, read_nnunet_dataset_json
from rcps_train.synthetic import make_synthetic_dataset
from tests.trainer.tiny_data import SHAPE, tiny_dataset


def test_nifti_layout_loads_sorted_normalised_cases(tmp_path):
    root = tiny_dataset(tmp_path / "data")
    cases = list_cases(root, "train", "nifti")
    assert [c.name for c in cases] == [f"case_{i:03d}" for i in range(4)]
    image, label = load_case(cases[0], num_classes=2)
    assert image.shape == (1, *SHAPE) and label.shape == SHAPE
    assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3
    raw = np.asarray(nib.load(cases[0].label).dataobj)
    np.testing.assert_array_equal(label, raw)
    assert set(np.unique(label)) <= {0, 1} and label.any()


def test_h5_layout_la_style(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "2018LA_Seg_Training Set"
    ids = ["B", "A", "C"]
    for case_id in ids:
        (folder / case_id).mkdir(parents=True)
        with h5py.File(folder / case_id / "mri_norm2.h5", "w") as f:
            f["image"] = rng.random(SHAPE, dtype=np.float32) * 5 + 2
            f["label"] = (rng.random(SHAPE) > 0.7).astype(np.uint8)
    (tmp_path / "train.list").write_text("B\nA\n")
    (tmp_path / "test.list").write_text("C\n")
    train = list_cases(tmp_path, "train", "h5")
    assert [c.name for c in train] == ["A", "B"]
    image, label = load_case(train[0], 2)
    with h5py.File(folder / "A" / "mri_norm2.h5") as f:
        expected = np.asarray(f["label"])
    np.testing.assert_array_equal(label, expected)
    assert abs(image.std() - 1) < 1e-3
    assert [c.name for c in list_cases(tmp_path, "val", "h5")] == ["C"]


def test_h5_pancreas_float_labels_and_missing_file(tmp_path):
    (tmp_path / "Pancreas_h5").mkdir()
    with h5py.File(tmp_path / "Pancreas_h5" / "image0001_norm.h5", "w") as f:
        f["image"] = np.ones(SHAPE, np.float32) + np.arange(SHAPE[-1], dtype=np.float32)
        f["label"] = np.zeros(SHAPE, np.float32)
    (tmp_path / "train.list").write_text("image0001\nimage0002\n")
    with pytest.raises(DataError, match="image0002"):
        list_cases(tmp_path, "train", "h5")


def test_labeled_subset_by_count_and_by_id_file(tmp_path):
    cases = list_cases(tiny_dataset(tmp_path / "data"), "train", "nifti")
    labeled, unlabeled = split_labeled(cases, 1)
    assert [c.name for c in labeled] == ["case_000"] and len(unlabeled) == 3
    ids = tmp_path / "ids.txt"
    ids.write_text("case_002\ncase_001\n")
    labeled, unlabeled = split_labeled(cases, str(ids))
    assert [c.name for c in labeled] == ["case_001", "case_002"]
    assert [c.name for c in unlabeled] == ["case_000", "case_003"]
    ids.write_text("case_999\n")
    with pytest.raises(DataError, match="case_999"):
        split_labeled(cases, str(ids))
    assert split_labeled(cases, 4) == (cases, [])  # dataset_splits then asks for data.unlabeled_dir
    assert split_labeled(cases, "all") == (cases, [])


def test_errors_name_the_file(tmp_path):
    root = tiny_dataset(tmp_path / "data")
    cases = list_cases(root, "train", "nifti")
    # Label values outside the classes.
    bad = np.full(SHAPE, 3, np.uint8)
    nib.save(nib.Nifti1Image(bad, np.eye(4)), cases[0].label)
    with pytest.raises(DataError, match=r"case_000.*outside the classes"):
        VolumeStore(cases, num_classes=2, channels=1)
    # Shape mismatch.
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), cases[1].label)
    with pytest.raises(DataError, match=r"case_001.*shape"):
        load_case(cases[1], 2)
    # Corrupt (truncated) file.
    data = cases[2].image.read_bytes()
    cases[2].image.write_bytes(gzip.compress(gzip.decompress(data)[:400]))
    with pytest.raises(DataError, match=r"cannot read NIfTI file .*case_002"):
        load_case(cases[2], 2)
    # Missing label file.
    cases[3].label.unlink()
    with pytest.raises(DataError, match=r"label file .*case_003"):
        list_cases(root, "train", "nifti")


def test_empty_dataset_and_missing_root(tmp_path):
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train_labels").mkdir()
    with pytest.raises(DataError, match="no train cases"):
        list_cases(tmp_path, "train", "nifti")
    with pytest.raises(DataError, match="not a folder"):
        list_cases(tmp_path / "nope", "train", "nifti")


def test_random_crop_pads_small_volumes_and_keeps_alignment():
    rng = np.random.default_rng(0)
    image = np.arange(10 * 6 * 4, dtype=np.float32).reshape(1, 10, 6, 4) + 1
    image = np.concatenate([image, -image])  # two channels, cropped alike
    label = (image[0] % 3 == 0).astype(np.int64)
    crop_image, crop_label = random_crop(image, label, (8, 8, 8), rng)
    assert crop_image.shape == (2, 8, 8, 8) and crop_label.shape == (8, 8, 8)
    assert (crop_image[0] == 0).sum() == 8 * 8 * 8 - 8 * 6 * 4  # padding only where the volume is short
    np.testing.assert_array_equal(crop_image[1], -crop_image[0])
    inside = crop_image[0] > 0
    np.testing.assert_array_equal(crop_label[inside], (crop_image[0][inside] % 3 == 0))


def test_grid_distortion_moves_voxels_but_keeps_labels_aligned():
    rng = np.random.default_rng(1)
    image = np.random.default_rng(2).random((1, 20, 20, 20)).astype(np.float32)
    label = (image[0] > 0.5).astype(np.int64)
    out_image, out_label = random_grid_distortion(np.concatenate([image, 2 * image]), label.copy(), rng, 5, 0.3)
    assert out_image.shape == (2, 20, 20, 20) and not np.allclose(out_image[:1], image)
    np.testing.assert_allclose(out_image[1], 2 * out_image[0], rtol=1e-6)  # every channel moves alike
    assert set(np.unique(out_label)) <= {0, 1}
    # Nearest-neighbour labels come from the same source voxels as the image: with limit 0 nothing moves.
    same_image, same_label = random_grid_distortion(image, label, rng, limit=0.0)
    np.testing.assert_allclose(same_image, image, atol=1e-6)
    np.testing.assert_array_equal(same_label, label)


def test_epoch_plan_is_deterministic_and_shards_ranks():
    plan = epoch_plan(3, 10, epoch=2, seed=7)
    assert plan == epoch_plan(3, 10, epoch=2, seed=7)
    assert plan != epoch_plan(3, 10, epoch=3, seed=7)
    assert sorted(item[2] for item in plan) == list(range(10))  # one pass over the unlabeled cases
    assert {item[0] for item in plan} == {0, 1, 2}  # labeled cases cycle
    rank0, rank1 = (epoch_plan(3, 10, 2, 7, rank=r, world_size=2) for r in (0, 1))
    assert len(rank0) == len(rank1) == 5
    assert sorted(i[2] for i in rank0 + rank1) == list(range(10))
    assert len(epoch_plan(3, 10, 0, 7, max_steps=4)) == 4


def test_paired_dataset_items_are_reproducible(tmp_path):
    root = tiny_dataset(tmp_path / "data")
    labeled, unlabeled = split_labeled(list_cases(root, "train", "nifti"), 1)
    dataset = PairedPatchDataset(
        VolumeStore(labeled, 2, 1), VolumeStore(unlabeled, 2, 1, cache=False), (16, 16, 16), distortion_prob=1.0
    )
    a, b = dataset[(0, 11, 1, 12)], dataset[(0, 11, 1, 12)]
    other = dataset[(0, 13, 1, 12)]
    assert a["image_l"].shape == (1, 16, 16, 16) and a["label_l"].dtype.is_floating_point is False
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["image_l"] == other["image_l"]).all()


def test_nnunet_layout_reads_dataset_json_and_test_folders(tmp_path):
    root = make_synthetic_dataset(tmp_path / "nn", 5, 2, SHAPE, seed=0, layout="nnunet")
    assert (root / "imagesTr" / "case_000_0000.nii.gz").exists() and (root / "labelsTs" / "test_001.nii.gz").exists()
    assert read_nnunet_dataset_json(root)["num_classes"] == 2
    train, test = list_cases(root, "train", "nnunet"), list_cases(root, "val", "nnunet")
    assert [c.name for c in train] == [f"case_{i:03d}" for i in range(5)]
    assert [c.image.parent.name for c in test] == ["imagesTs"] * 2
    image, label = load_case(train[0], 2)
    nifti = make_synthetic_dataset(tmp_path / "same", 5, 0, SHAPE, seed=0)  # the same volumes in the NIfTI layout
    np.testing.assert_array_equal(label, load_case(list_cases(nifti, "train", "nifti")[0], 2)[1])
    # Without labelsTs a fixed split of the training cases is the test split, the same on every call.
    (root / "labelsTs" / "test_000.nii.gz").rename(tmp_path / "moved.nii.gz")
    for path in (root / "labelsTs").iterdir():
        path.unlink()
    (root / "labelsTs").rmdir()
    held_out = [c.name for c in list_cases(root, "val", "nnunet")]
    rest = [c.name for c in list_cases(root, "train", "nnunet")]
    assert len(held_out) == 1 and sorted(held_out + rest) == [f"case_{i:03d}" for i in range(5)]
    assert held_out == [c.name for c in list_cases(root, "val", "nnunet")]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(channel_names={"0": "T1", "2": "T2"}), "channel indices '0', '1'"),
        (lambda m: m.update(channel_names={}), "channel indices '0', '1'"),
        (lambda m: m.update(labels={"background": 0, "a": 1, "b": 3}), "integers 0..n-1"),
        (lambda m: m.update(labels={"background": 0, "both": [1, 2]}), "region-based"),
        (lambda m: m.update(file_ending=".mha"), "file_ending '.mha'"),
        (lambda m: m.update(numTraining=7), "numTraining = 7"),
        (lambda m: m.pop("labels"), "lacks \\['labels'\\]"),
        (lambda m: m.update(labels=["background", "foreground"]), "integers 0..n-1"),
    ],
)
def test_nnunet_dataset_json_errors_name_the_file(tmp_path, edit, message):
    root = make_synthetic_dataset(tmp_path / "nn", 3, 1, SHAPE, seed=0, layout="nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset\.json.*" + message):
        list_cases(root, "train", "nnunet")


def test_nnunet_label_count_must_match_num_classes(tmp_path):
    root = make_synthetic_dataset(tmp_path / "nn", 4, 1, SHAPE, seed=0, layout="nnunet")
    config = load_config(
        None,
        [
            f'data.root="{root}"',
            'data.format="nnunet"',
            "data.labeled=1",
            "data.num_classes=3",
            "loss.class_weights=[1.0, 1.0, 1.0]",
        ],
    )
    with pytest.raises(DataError, match=r"dataset\.json defines 2 labels but data\.num_classes is 3"):
        dataset_splits(config["data"])


def test_h5_layout_written_by_make_synthetic(tmp_path):
    root = make_synthetic_dataset(tmp_path / "h5", 3, 2, SHAPE, seed=0, layout="h5")
    assert [c.name for c in list_cases(root, "train", "h5")] == ["case_000", "case_001", "case_002"]
    assert [c.name for c in list_cases(root, "val", "h5")] == ["test_000", "test_001"]
    assert load_case(list_cases(root, "val", "h5")[0], 2)[1].any()


def test_validation_split_comes_from_the_unlabeled_cases(tmp_path):
    cases = list_cases(make_synthetic_dataset(tmp_path / "d", 6, 1, SHAPE, seed=0), "train", "nifti")
    labeled, unlabeled = split_labeled(cases, 2)
    rest, validation = split_validation(unlabeled, labeled, 2)
    assert [c.name for c in validation] == ["case_004", "case_005"]
    assert [c.name for c in rest] == ["case_002", "case_003"]
    assert split_validation(unlabeled, labeled, 0) == (unlabeled, [])
    ids = tmp_path / "val.txt"
    ids.write_text("case_003\n")
    assert [c.name for c in split_validation(unlabeled, labeled, str(ids))[1]] == ["case_003"]
    ids.write_text("case_001\n")  # a labeled case: its label would be trained on
    with pytest.raises(DataError, match=r"data\.val_cases.*labeled training cases \['case_001'\]"):
        split_validation(unlabeled, labeled, str(ids))
    assert split_validation(unlabeled, labeled, 4) == ([], unlabeled)  # dataset_splits then asks for unlabeled data
    with pytest.raises(DataError, match=r"data\.val_cases = 5 asks for more cases than the 4 unlabeled"):
        split_validation(unlabeled, labeled, 5)


def test_backup_files_are_not_cases_and_empty_root_is_an_error(tmp_path, monkeypatch):
    root = tiny_dataset(tmp_path / "data")
    (root / "train_images" / "case_000.nii.gz.bak").write_bytes(b"old")
    (root / "train_images" / "notes.txt").write_text("x")
    assert [c.name for c in list_cases(root, "train", "nifti")] == [f"case_{i:03d}" for i in range(4)]
    # An empty data.root is not the current folder, even when that folder holds a dataset.
    monkeypatch.chdir(root)
    with pytest.raises(DataError, match="data.root is empty"):
        list_cases("", "train", "nifti")
