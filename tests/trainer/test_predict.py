"""``rcps-train predict``: raw scans -> prepare -> train (a few steps) -> predict on the input's exact grid, bad
inputs among good ones, ``--skip-existing``, test-time flips, probabilities and the checkpoint's preparation."""

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from rcps_train import geometry
from rcps_train.cli import main
from rcps_train.config import ConfigError, load_config
from rcps_train.engine import train
from rcps_train.predict import collect_inputs, load_models, predict_probabilities, run_predict
from rcps_train.prepare import read_preprocessing, run_prepare
from tests.trainer.raw_scans import write_raw_dataset
from tests.trainer.tiny_data import tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A raw dataset (anisotropic, flipped and rotated grids, a spacing per case), its preparation and a
    checkpoint trained on it for a few steps: ``(raw root, prepared root, checkpoint)``."""
    root = tmp_path_factory.mktemp("predict")
    raw = write_raw_dataset(root / "raw", val=2)
    prepared = root / "prepared"
    run_prepare(raw, prepared, progress=False)
    overrides = tiny_overrides(prepared, root / "runs", **{"train.epochs": 1, "data.val_cases": 1})
    train(load_config(None, overrides))
    return raw, prepared, root / "runs" / "rcps" / "checkpoint.pt"


def _same_header(output, source):
    assert output.shape == source.shape
    np.testing.assert_array_equal(output.affine, source.affine)
    for key in ("qform_code", "sform_code", "pixdim", "quatern_b", "quatern_c", "quatern_d", "qoffset_x"):
        np.testing.assert_array_equal(output.header[key], source.header[key])
    np.testing.assert_array_equal(output.header.get_sform(), source.header.get_sform())
    np.testing.assert_array_equal(output.header.get_qform(), source.header.get_qform())


def test_predict_writes_labels_on_each_inputs_exact_grid(trained, tmp_path):
    raw, _, checkpoint = trained
    inputs = sorted((raw / "val_images").iterdir())
    # Another format than NIfTI: the same scan as MHA.
    sitk.WriteImage(sitk.ReadImage(str(inputs[0])), str(tmp_path / "as_mha.mha"))
    inputs_arg = [str(raw / "val_images"), str(tmp_path / "as_mha.mha")]
    args = ["predict", "--checkpoint", str(checkpoint), "--input", *inputs_arg]
    args += ["--out", str(tmp_path / "out"), "--probabilities", "--device", "cpu"]
    assert main(args) == 0
    for source_path in inputs:
        source = nib.load(source_path)
        output = nib.load(tmp_path / "out" / source_path.name)
        _same_header(output, source)
        assert output.get_data_dtype() == np.uint8 and set(np.unique(output.get_fdata())) <= {0.0, 1.0}
        probabilities = nib.load(tmp_path / "out" / source_path.name.replace(".nii.gz", "_probabilities.nii.gz"))
        assert probabilities.shape == (*source.shape, 2) and probabilities.get_data_dtype() == np.float32
        values = probabilities.get_fdata()
        np.testing.assert_allclose(values.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(values.argmax(-1), output.get_fdata())  # the rcps protocol keeps all components
    mha, written = sitk.ReadImage(str(inputs[0])), sitk.ReadImage(str(tmp_path / "out" / "as_mha.nii.gz"))
    assert written.GetSize() == mha.GetSize() and geometry.same_grid(written, mha)
    # The MHA and the NIfTI copy of one scan get the same segmentation.
    np.testing.assert_array_equal(geometry.to_array(written), nib.load(tmp_path / "out" / inputs[0].name).get_fdata())


def test_one_bad_input_among_good_ones_and_skip_existing(trained, tmp_path, capsys):
    raw, _, checkpoint = trained
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((raw / "val_images").iterdir())
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "corrupt.nii.gz").write_bytes(b"not a scan at all" * 10)
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), folder / "flat.nii.gz")
    nan_scan = np.random.default_rng(0).normal(size=(20, 20, 12)).astype(np.float32)
    nan_scan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan_scan, np.eye(4)), folder / "holes.nii.gz")
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "3 cases failed" in err
    for name in ("corrupt.nii.gz", "flat.nii.gz", "holes.nii.gz"):
        assert str(folder / name) in err
    assert "2 dimensions" in err and "NaN" in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [p.name for p in good]  # no partial files either
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    summary = run_predict([checkpoint], [folder], tmp_path / "out", skip_existing=True, progress=False)
    assert summary["written"] == [] and summary["skipped"] == [p.name[: -len(".nii.gz")] for p in good]
    assert sorted(summary["failed"]) == ["corrupt", "flat", "holes"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_checkpoint_carries_its_preparation(trained, tmp_path):
    raw, prepared, checkpoint = trained
    state = torch.load(checkpoint, weights_only=False)
    # train copied the data root's preparation into the checkpoint and the run folder.
    assert state["preprocessing"] == read_preprocessing(prepared) is not None
    assert json.loads((checkpoint.parent / "preprocessing.json").read_text()) == state["preprocessing"]
    state["config"]["data"]["root"] = str(tmp_path / "moved")  # the data root is gone: the checkpoint suffices
    torch.save(state, tmp_path / "carries.pt")
    summary = run_predict([tmp_path / "carries.pt"], [raw / "val_images"], tmp_path / "out", progress=False)
    assert summary["failed"] == {} and len(summary["written"]) == 2
    # The ssl-la protocol keeps the largest connected component of the foreground.
    summary = run_predict(
        [tmp_path / "carries.pt"], [raw / "val_images"], tmp_path / "lcc", protocol="ssl-la", progress=False
    )
    for name in summary["written"]:
        foreground = nib.load(tmp_path / "lcc" / f"{name}.nii.gz").get_fdata() == 1
        assert ndimage.label(foreground, np.ones((3, 3, 3)))[1] <= 1
    state["preprocessing"]["plan"]["target_spacing"] = [2.0, 2.0, 2.0]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="differently prepared"):
        load_models([checkpoint, tmp_path / "other.pt"], None, torch.device("cpu"))


def test_flip_averaging_makes_the_prediction_flip_equivariant(trained):
    models = load_models([trained[2]], None, torch.device("cpu"))
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)  # one window: no edge effects
    flipped = np.ascontiguousarray(image[:, ::-1, :, ::-1])
    with_tta = predict_probabilities(models, image, torch.device("cpu"), tta=True)
    np.testing.assert_allclose(
        predict_probabilities(models, flipped, torch.device("cpu"), tta=True), with_tta[:, ::-1, :, ::-1], atol=1e-5
    )
    without = predict_probabilities(models, image, torch.device("cpu"), tta=False)
    assert not np.allclose(without, with_tta, atol=1e-5)  # the flips do change the average


def test_channel_files_form_one_case(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0003.nii.gz", "c.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = collect_inputs([tmp_path])
    assert [(c.name, [p.name for p in c.files]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]),
        ("b_0003", ["b_0003.nii.gz"]),  # no b_0000: a case of its own
        ("c", ["c.nrrd"]),
    ]
    with pytest.raises(Exception, match="does not exist"):
        collect_inputs([tmp_path / "missing.nii.gz"])
