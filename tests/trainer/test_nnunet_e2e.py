"""End to end on CPU with nnU-Net's own entry points: plan and preprocess a tiny raw dataset, preprocess its
unlabeled images, train 3d_fullres and 2d with an nnUNetTrainerRCPS variant through ``rcps-nnunet train`` (which
also runs nnU-Net's final validation), and predict a test image with ``rcps-nnunet predict``."""

from __future__ import annotations

import json
import os

os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnunetv2 reads it at import: one export worker

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("nnunetv2")
nib = pytest.importorskip("nibabel")

from rcps_nnunet import cli  # noqa: E402
from rcps_nnunet.progress import LOGGED_TERMS, PLOT_FILE  # noqa: E402
from tests.trainer.nnunet_data import (  # noqa: E402
    DATASET,
    TINY_TRAINER,
    nnunet_folders,
    write_tiny_trainer,
)


@pytest.fixture
def nnunet_env(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(write_tiny_trainer(tmp_path / "ext")))
    with nnunet_folders(tmp_path_factory, tmp_path / "results", {"num_negatives": 50}) as folders:
        yield folders


def _train(configuration: str) -> None:
    assert cli.main(["train", DATASET, configuration, "0", "-tr", TINY_TRAINER, "-device", "cpu"]) == 0


def test_train_3d_and_2d_then_predict(nnunet_env, tmp_path):
    results = nnunet_env["nnUNet_results"] / DATASET
    for configuration in ("3d_fullres", "2d"):
        _train(configuration)
        fold = results / f"{TINY_TRAINER}__nnUNetPlans__{configuration}" / "fold_0"
        checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == TINY_TRAINER
        assert checkpoint["rcps"]["settings"]["num_negatives"] == 50
        logged = checkpoint["logging"]
        assert all(len(logged[f"rcps_{name}"]) == 1 for name in LOGGED_TERMS)
        assert all(logged[f"rcps_{name}"][0] > 0 for name in ("urp_u", "cr_u", "bc_u", "bc_l", "urp_l"))
        assert (fold / "progress.png").is_file() and (fold / PLOT_FILE).is_file()
        assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0
    test_images = nnunet_env["nnUNet_raw"] / DATASET / "imagesTs"
    out = tmp_path / "predicted"
    flags = ["-i", str(test_images), "-o", str(out), "-d", DATASET, "-c", "3d_fullres", "-f", "0", "-tr", TINY_TRAINER]
    assert cli.main(["predict", *flags, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]) == 0
    image = nib.load(test_images / "test_000_0000.nii.gz")
    prediction = nib.load(out / "test_000.nii.gz")
    assert prediction.shape == image.shape
    assert (prediction.affine == image.affine).all()
    assert set(torch.from_numpy(prediction.get_fdata()).unique().tolist()) <= {0.0, 1.0}


def test_training_without_unlabeled_cases_says_what_to_run(nnunet_env, capsys):
    stamp = nnunet_env["nnUNet_preprocessed"] / DATASET / "nnUNetPlans_2d_unlabeled.json"
    saved = stamp.read_text()
    stamp.unlink()
    try:
        assert cli.main(["train", DATASET, "2d", "0", "-tr", TINY_TRAINER, "-device", "cpu"]) == 2
        assert f"run `rcps-nnunet preprocess-unlabeled {DATASET} -c 2d` first" in capsys.readouterr().err
    finally:
        stamp.write_text(saved)
