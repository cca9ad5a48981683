"""Evaluation protocols: the field's sliding-window arithmetic, the largest-component filter, the voxel spacing
of each layout, and ``rcps-train eval --protocol`` re-scoring a checkpoint."""

import json
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from rcps_train import engine
from rcps_train.cli import main
from rcps_train.config import ConfigError, load_config
from rcps_train.data import case_spacing, load_case
from rcps_train.evaluate import (
    PROTOCOLS,
    distance_unit,
    eval_settings,
    keep_largest_component,
    sliding_window_inference,
    window_starts,
)
from rcps_train.knobs import EVAL_PROTOCOLS
from rcps_train.layouts import Case, DataError, list_cases
from rcps_train.metrics import binary_metrics
from rcps_train.model import build_model
from tests.trainer.tiny_data import tiny_dataset, tiny_overrides


def test_window_starts_follow_the_ceil_formula():
    # ceil((size - window) / stride) + 1 windows at min(stride * i, size - window).
    assert window_starts(80, 80, 4) == [0]
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(90, 80, 4) == [0, 4, 8, 10]
    assert window_starts(130, 112, 18) == [0, 18]
    assert window_starts(131, 112, 18) == [0, 18, 19]
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(9, 4, 3) == [0, 3, 5]


def _position_model(window):
    """Logits (0, image + g(offset in the window)): the mean of its softmax depends on which windows cover a voxel."""
    offsets = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in window], indexing="ij"))
    local = torch.sin(offsets[0] * 0.7) + 0.3 * offsets[1] - 0.5 * offsets[2]

    def predict(x):
        return torch.cat([torch.zeros_like(x), x + local], dim=1)

    return predict, local.numpy()


def test_plain_averaging_matches_a_direct_computation():
    window, stride = (4, 4, 3), (3, 3, 2)
    image = np.random.default_rng(0).standard_normal((10, 9, 2)).astype(np.float32)  # last axis < window: padded
    # By hand: starts [0, 3, 6], [0, 3, 5]; the last axis is padded 2 -> 3 (0 before, 1 after): start [0].
    starts = ([0, 3, 6], [0, 3, 5], [0])
    padded = np.pad(image, [(0, 0), (0, 0), (0, 1)])
    predict, local = _position_model(window)
    prob_sum, count = np.zeros(padded.shape), np.zeros(padded.shape)
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                region = (slice(x, x + 4), slice(y, y + 4), slice(z, z + 3))
                prob_sum[region] += 1 / (1 + np.exp(-(padded[region] + local)))  # softmax of (0, l), class 1
                count[region] += 1
    expected = (prob_sum / count)[:, :, :2]
    out = sliding_window_inference(
        predict, torch.from_numpy(image)[None, None], window, stride, blending="mean", sw_batch_size=4
    )
    assert out.shape == (1, 2, 10, 9, 2)
    np.testing.assert_allclose(out[0, 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0].sum(0).numpy(), 1.0, rtol=1e-5)
    # Averaging probabilities is not averaging logits: the two blendings give different maps here.
    logits = sliding_window_inference(predict, torch.from_numpy(image)[None, None], window, stride, blending="gaussian")
    assert not np.allclose(torch.sigmoid(logits[0, 1]).numpy(), expected, atol=1e-3)


def test_protocol_settings():
    assert set(PROTOCOLS) == set(EVAL_PROTOCOLS)
    config = load_config(None, ['eval.protocol="ssl-la"', "data.patch_size=[96, 96, 64]"])
    assert eval_settings(config) == ((112, 112, 80), (18, 18, 4), "mean", True)
    config = load_config(None, ['eval.protocol="ssl-la"', 'eval.largest_component="off"'])
    assert eval_settings(config)[3] is False
    config = load_config(None, ['eval.protocol="ssl-pancreas"'])
    assert eval_settings(config) == ((96, 96, 96), (16, 16, 16), "mean", False)
    config = load_config(None, ["data.patch_size=[96, 96, 64]", "eval.overlap=0.875"])
    assert eval_settings(config) == ((96, 96, 64), (12, 12, 8), "gaussian", False)
    with pytest.raises(ConfigError, match="eval.protocol"):
        load_config(None, ['eval.protocol="la"'])
    with pytest.raises(ConfigError, match="eval.largest_component"):
        load_config(None, ['eval.largest_component="yes"'])


def test_largest_component_per_class_with_26_connectivity():
    pred = np.zeros((8, 8, 8), np.int64)
    pred[0:3, 0:3, 0:3] = 1  # class 1: 27 voxels
    pred[3, 3, 3] = 1  # touches the cube by a corner only: the same 26-connected component
    pred[6:8, 6:8, 0:1] = 1  # class 1: a separate 4-voxel island
    pred[5:8, 0:2, 5:8] = 2  # class 2: 18 voxels
    pred[0, 6, 7] = 2  # class 2: an isolated voxel
    out = keep_largest_component(pred, 3)
    expected = pred.copy()
    expected[6:8, 6:8, 0:1] = 0
    expected[0, 6, 7] = 0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(keep_largest_component(np.zeros_like(pred), 3), 0)  # empty: unchanged
    assert pred[6, 6, 0] == 1  # the input is not modified


def test_case_spacing_nifti_and_h5(tmp_path):
    affine = np.diag([0.6, 0.7, 2.5, 1.0])
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp_path / "a.nii.gz")
    assert case_spacing(Case("a", tmp_path / "a.nii.gz", tmp_path / "a.nii.gz")) == pytest.approx((0.6, 0.7, 2.5))
    image.header.set_xyzt_units("meter")
    nib.save(image, tmp_path / "m.nii.gz")
    assert case_spacing(Case("m", tmp_path / "m.nii.gz", tmp_path / "m.nii.gz")) == pytest.approx((600, 700, 2500))
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["image"] = np.zeros((4, 4, 4))
        f.attrs["spacing"] = [0.625, 0.625, 1.25]
    with h5py.File(tmp_path / "n.h5", "w") as f:
        f["image"] = np.zeros((4, 4, 4))
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.attrs["spacing"] = [1.0, 0.0]
    cases = [Case(n, tmp_path / f"{n}.h5", tmp_path / f"{n}.h5") for n in ("s", "n", "bad")]
    assert case_spacing(cases[0]) == (0.625, 0.625, 1.25)
    assert case_spacing(cases[1]) is None
    with pytest.raises(DataError, match="bad.h5.*spacing"):
        case_spacing(cases[2])
    assert distance_unit(cases[:1], [(1.0, 1.0, 1.0)]) == "mm" and distance_unit(cases[1:2], [None]) == "voxel"
    with pytest.raises(DataError, match=r"\['n'\].*mix"):
        distance_unit(cases[:2], [(1.0, 1.0, 1.0), None])


def test_eval_command_rescores_a_checkpoint_under_ssl_la(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    config = load_config(
        None,
        tiny_overrides(
            data,
            tmp_path,
            **{
                "run.name": '"run"',
                "train.epochs": 1,
                "train.max_steps_per_epoch": 1,
                "train.method": '"supervised"',
                "eval.every_epochs": 0,
                "data.patch_size": "[32, 32, 16]",
            },
        ),
    )
    summary = engine.train(config)
    assert summary["protocol"] == "rcps" and summary["largest_component"] is False
    run_metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--protocol", "ssl-la"]) == 0
    printed = capsys.readouterr().out
    assert "Jaccard" in printed and "distances in mm" in printed
    (folder,) = (tmp_path / "run").glob("eval-checkpoint-ssl-la-val-lcc-on-*")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["checkpoint"] == str((tmp_path / "run" / "checkpoint.pt").resolve())
    assert metrics["checkpoint_epoch"] == 1 and metrics["split"] == "val" and metrics["data_root"] == str(data)
    assert (tmp_path / "run" / "metrics.json").read_text() == run_metrics  # the run's own numbers stay
    assert metrics["protocol"] == "ssl-la" and metrics["largest_component"] is True
    assert metrics["distance_unit"] == "mm"  # NIfTI header spacing (1 mm here)
    assert [row["case"] for row in metrics["per_case"]] == ["test_000", "test_001"]
    for row in metrics["per_case"]:
        assert {"dice", "jaccard", "hd95", "asd"} <= set(row)
        assert row["jaccard"] == pytest.approx(row["dice"] / (2 - row["dice"]))  # J = D / (2 - D) per mask
    dice = [row["dice"] for row in metrics["per_case"]]
    assert metrics["dice"] == pytest.approx(float(np.mean(dice))) and 0.0 <= metrics["dice"] <= 1.0

    # The re-score is the ssl-la pipeline: window 112x112x80 (the 32x32x24 volumes padded), averaged softmax, LCC.
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    # A checkpoint saved before the eval keys existed re-scores the same, with their defaults filled in.
    old = {
        **state,
        "config": {
            **state["config"],
            "eval": {k: v for k, v in state["config"]["eval"].items() if k not in ("protocol", "largest_component")},
        },
    }
    torch.save(old, tmp_path / "old.pt")
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "old.pt"), "--protocol", "ssl-la", "--out", str(tmp_path / "old")])
        == 0
    )
    rescored = json.loads((tmp_path / "old" / "metrics.json").read_text())
    assert rescored.pop("checkpoint") == str((tmp_path / "old.pt").resolve())
    assert rescored == {key: value for key, value in metrics.items() if key != "checkpoint"}
    model = build_model(config, 1)
    model.load_state_dict(state["model"])
    model.eval()
    case = list_cases(data, "val", "nifti")[0]
    image, label = load_case(case, 2)
    scores = sliding_window_inference(
        model.segment, torch.from_numpy(image)[None], (112, 112, 80), (18, 18, 4), blending="mean"
    )
    pred = keep_largest_component(scores.argmax(1)[0].numpy(), 2)
    direct = binary_metrics(pred == 1, label == 1, case_spacing(case))
    for key in ("dice", "jaccard", "hd95", "asd"):
        value = metrics["per_case"][0][key]
        assert (value is None and math.isnan(direct[key])) or value == pytest.approx(direct[key], rel=1e-6)
