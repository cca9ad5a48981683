"""``rcps-train prepare``: the fingerprint's decisions, CT constants against a direct computation, a label through
the preparation and its inverse, layouts, re-runs and the official recipes (tiny synthetic scans)."""

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from rcps_train import geometry
from rcps_train.cli import main
from rcps_train.layouts import DataError
from rcps_train.prepare import (
    PREPROCESSING_FILE,
    apply_preparation,
    choose_target_spacing,
    prepare_label,
    read_label,
    read_preprocessing,
    run_prepare,
)
from tests.trainer.raw_scans import RAW_GRIDS, direction_matrix, grid_image, raw_scan, write_raw_dataset


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_target_spacing_median_and_the_anisotropic_rule():
    near_isotropic = np.array([[1.0, 1.0, 1.5], [0.8, 0.9, 2.5], [1.2, 1.0, 2.0]])
    target, rule = choose_target_spacing(near_isotropic, np.full((3, 3), 100))
    assert target == pytest.approx([1.0, 1.0, 2.0]) and rule.startswith("median")
    slices = np.array([[1.0, 1.0, z] for z in (5.0, 5.0, 4.0, 6.0, 2.0)])
    shapes = np.array([[200, 200, 30]] * 5)
    target, rule = choose_target_spacing(slices, shapes)
    assert target == pytest.approx([1.0, 1.0, np.percentile([5, 5, 4, 6, 2], 10)]) and "anisotropic" in rule
    # Many voxels along the coarse axis: not anisotropic in nnU-Net's sense, the median stays.
    assert choose_target_spacing(slices, np.array([[200, 200, 150]] * 5))[0] == pytest.approx([1.0, 1.0, 5.0])


def test_label_survives_preparation_and_its_inverse():
    rng = np.random.default_rng(1)
    plan = {
        "orientation": geometry.CANONICAL_ORIENTATION,
        "crop": "nonzero",
        "target_spacing": [1.0, 1.0, 1.7],
        "image_interpolator": "bspline",
        "channels": [{"scheme": "zscore"}],
        "num_classes": 2,
    }
    for spacing, direction in RAW_GRIDS:
        image, label = raw_scan(spacing, direction, rng)
        prepared = apply_preparation([image], plan)
        assert prepared.grid.GetSpacing() == pytest.approx(plan["target_spacing"])
        assert geometry.orientation_code(prepared.grid) == "RAS"  # the closest axes for the rotated grids
        assert prepared.array.shape[1:] == prepared.grid.GetSize()
        on_grid = prepare_label(label, prepared, plan)
        assert set(np.unique(on_grid)) == {0, 1}
        one_hot = np.stack([on_grid == 0, on_grid == 1]).astype(np.float32)
        back = geometry.resample_scores(one_hot, prepared.grid, image).argmax(0)
        assert back.shape == tuple(image.GetSize())
        assert dice(back == 1, geometry.to_array(label) == 1) >= 0.98


def test_reorientation_and_nonzero_crop_are_exact():
    rng = np.random.default_rng(2)
    image, _ = raw_scan(*RAW_GRIDS[0], rng)  # ITK's identity direction is LPS: RAS reverses the first two axes
    plan = {"orientation": "RAS", "crop": "nonzero", "target_spacing": None, "channels": [{"scheme": "none"}]}
    prepared = apply_preparation([image], plan)
    raw = geometry.to_array(image)
    assert geometry.orientation_code(image) == "LPS" and geometry.orientation_code(prepared.grid) == "RAS"
    np.testing.assert_array_equal(prepared.array[0], raw[::-1, ::-1][: raw.shape[0] - 3])
    assert prepared.record["nonzero_box"] == [[0, raw.shape[0] - 3], [0, raw.shape[1]], [0, raw.shape[2]]]


def test_ct_constants_match_a_direct_computation(tmp_path):
    raw = write_raw_dataset(tmp_path / "raw", ct=True)
    assert main(["prepare", "--input", str(raw), "--out", str(tmp_path / "prepared")]) == 0
    payload = read_preprocessing(tmp_path / "prepared")
    foreground = []
    for path in sorted((raw / "train_images").iterdir()):
        image = nib.load(path).get_fdata()
        label = nib.load(raw / "train_labels" / path.name).get_fdata()
        foreground.append(image[label > 0])
    foreground = np.concatenate(foreground)
    (channel,) = payload["plan"]["channels"]
    assert channel["modality"] == "ct" and channel["scheme"] == "ct"  # detected from the air at -1000 HU
    assert channel["clip"] == pytest.approx(np.percentile(foreground, [0.5, 99.5]), rel=1e-5)
    assert channel["mean"] == pytest.approx(foreground.mean(), rel=1e-5)
    assert channel["std"] == pytest.approx(foreground.std(), rel=1e-5)
    # Anisotropic slices: the through-plane target is the 10th percentile of the 3 training spacings.
    spacings = payload["fingerprint"]["spacings"]
    assert payload["plan"]["target_spacing"][2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))
    prepared = nib.load(tmp_path / "prepared" / "train_images" / "case_0.nii.gz")
    assert prepared.header.get_zooms() == pytest.approx(payload["plan"]["target_spacing"], rel=1e-5)
    assert nib.aff2axcodes(prepared.affine) == ("R", "A", "S")
    values = prepared.get_fdata()
    low, high = (np.array(channel["clip"]) - channel["mean"]) / channel["std"]
    assert values.min() >= low - 1e-4 and values.max() <= high + 1e-4


def test_prepared_layout_and_a_rerun_keeps_finished_cases(tmp_path):
    raw = write_raw_dataset(tmp_path / "raw", val=1, unlabeled=1)
    out = tmp_path / "prepared"
    payload = run_prepare(raw, out, progress=False)
    assert read_preprocessing(out) == json.loads((out / PREPROCESSING_FILE).read_text()) == payload
    assert payload["plan"]["channels"] == [{"modality": "mri", "scheme": "zscore"}]
    groups = ["train/case_0", "train/case_1", "train/case_2", "unlabeled/case_4", "val/case_3"]
    assert sorted(payload["cases"]) == groups
    for name in ("train_images/case_0", "train_labels/case_0", "val_labels/case_3", "unlabeled_images/case_4"):
        assert (out / f"{name}.nii.gz").is_file()
    label = nib.load(out / "train_labels" / "case_1.nii.gz")
    image = nib.load(out / "train_images" / "case_1.nii.gz")
    assert label.shape == image.shape and np.allclose(label.affine, image.affine)
    assert set(np.unique(label.get_fdata())) == {0.0, 1.0}
    kept = (out / "train_images" / "case_0.nii.gz").stat().st_mtime_ns
    (out / ".prepare" / "cases" / "train__case_2.json").unlink()  # as if killed before case_2 was finished
    (out / "train_images" / "case_2.nii.gz").unlink()
    assert run_prepare(raw, out, progress=False)["cases"] == payload["cases"]
    assert (out / "train_images" / "case_0.nii.gz").stat().st_mtime_ns == kept
    assert (out / "train_images" / "case_2.nii.gz").is_file()
    with pytest.raises(DataError, match="other options .*modality"):
        run_prepare(raw, out, modality="ct", progress=False)


def test_nnunet_layout_with_two_channels_in_two_workers(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / folder).mkdir(parents=True)
    for index, (spacing, direction) in enumerate(RAW_GRIDS[:3]):
        image, label = raw_scan(spacing, direction, rng)
        split = "Tr" if index < 2 else "Ts"
        sitk.WriteImage(image, str(raw / f"images{split}" / f"case_{index}_0000.nii.gz"))
        sitk.WriteImage(sitk.Square(image), str(raw / f"images{split}" / f"case_{index}_0001.nii.gz"))
        if split == "Tr":
            sitk.WriteImage(label, str(raw / "labelsTr" / f"case_{index}.nii.gz"))
    meta = {"channel_names": {"0": "T1", "1": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2}
    (raw / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    payload = run_prepare(raw, tmp_path / "out", layout="nnunet", workers=2, progress=False)
    assert [c["modality"] for c in payload["plan"]["channels"]] == ["mri", "ct"]  # from channel_names
    out = tmp_path / "out"
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    first, second = (nib.load(out / "imagesTr" / f"case_0_000{c}.nii.gz") for c in range(2))
    assert first.shape == second.shape and (out / "labelsTr" / "case_0.nii.gz").is_file()
    assert (out / "imagesTs" / "case_2_0001.nii.gz").is_file() and not (out / "labelsTs").exists()


def test_la2018_recipe_crops_around_the_label_and_scales_to_unit_range(tmp_path):
    rng = np.random.default_rng(4)
    size = (250, 240, 60)
    image = rng.normal(100, 20, size).astype(np.float32)
    label = np.zeros(size, np.uint8)
    label[100:130, 90:150, 20:40] = 255  # 30 x 60 x 20 voxels
    image[label > 0] += 300
    for case in ("A1", "B2"):
        (tmp_path / "raw" / case).mkdir(parents=True)
        grid = grid_image(size, (0.625, 0.625, 2.5), (0, 0, 0), direction_matrix(0))
        sitk.WriteImage(geometry.from_array(image, grid), str(tmp_path / "raw" / case / "lgemri.nrrd"))
        sitk.WriteImage(geometry.from_array(label, grid), str(tmp_path / "raw" / case / "laendo.nrrd"))
    (tmp_path / "split.csv").write_text("filename,split\nA1,train\nB2,val\n")
    run_prepare(tmp_path / "raw", tmp_path / "out", recipe="la2018", split_csv=tmp_path / "split.csv", progress=False)
    out = nib.load(tmp_path / "out" / "val_images" / "B2.nii.gz")
    np.testing.assert_array_equal(out.affine, np.eye(4))
    # Widened to 112 x 112 x 80 around the box (clamped to the 60 slices), then 25 voxels on each side.
    expected = (slice(100 - 41 - 25, 130 + 41 + 25), slice(90 - 26 - 25, 150 + 26 + 25), slice(0, 60))
    clipped = np.minimum(image, np.percentile(image, 99.5))
    scaled = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    np.testing.assert_allclose(out.get_fdata(), scaled[expected], atol=1e-6)
    crop_label = nib.load(tmp_path / "out" / "val_labels" / "B2.nii.gz").get_fdata()
    np.testing.assert_array_equal(crop_label, label[expected] // 255)
    assert (tmp_path / "out" / "train_images" / "A1.nii.gz").is_file()


def test_bad_inputs_are_named(tmp_path):
    raw = write_raw_dataset(tmp_path / "raw")
    (raw / "train_labels" / "case_1.nii.gz").unlink()
    with pytest.raises(DataError, match="case_1"):
        run_prepare(raw, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="--spacing"):
        run_prepare(raw, tmp_path / "out", spacing=[1.0, 0.0, 1.0], progress=False)
    with pytest.raises(DataError, match="not a folder"):
        run_prepare(tmp_path / "missing", tmp_path / "out", progress=False)
    assert main(["prepare", "--input", str(raw), "--out", str(tmp_path / "out"), "--spacing", "1", "x", "2"]) == 2
    image, _ = raw_scan(*RAW_GRIDS[0], np.random.default_rng(0))
    shifted = sitk.Image(image)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(tmp_path / "label.nii.gz"))
    with pytest.raises(DataError, match="does not share its image's grid"):
        read_label(tmp_path / "label.nii.gz", image)
