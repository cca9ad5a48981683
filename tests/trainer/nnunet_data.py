"""A tiny nnU-Net v2 dataset for the nnU-Net integration tests (and benchmarks/bench_nnunet_step.py): 4 labeled
+ 3 unlabeled + 1 test case of 32^3.

``prepared_nnunet(root)`` writes the raw dataset (imagesTr/labelsTr, imagesUnlabeled, imagesTs), plans and
preprocesses it with nnU-Net (2d and 3d_fullres), preprocesses the unlabeled cases and writes a one-fold split
(3 training, 1 validation case). Each test process builds it once (module cache) and tests copy nothing from it
that they change: trainers write into their own results folders.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID:03d}_RCPSTiny"
SHAPE = (32, 32, 32)
CONFIGURATIONS = ("3d_fullres", "2d")
FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

_PREPARED: dict[tuple, dict[str, Path]] = {}


def set_nnunet_environment(folders: dict[str, Path]) -> dict[str, str | None]:
    """Point nnU-Net at ``folders`` (and keep it in-process); returns the previous values for
    :func:`restore_environment`."""
    quiet = {"nnUNet_n_proc_DA": "0", "nnUNet_compile": "0", "nnUNet_def_n_proc": "1"}
    values = {**{name: str(folders[name]) for name in FOLDER_VARIABLES}, **quiet}
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return previous


def restore_environment(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def nnunet_folders(tmp_path_factory, results: Path, settings: dict):
    """The tiny prepared dataset with a fresh ``results`` folder, nnU-Net's variables pointed at them and the RCPS
    settings in ``RCPS_NNUNET_SETTINGS``, for the duration; the variables and torch's thread count (nnU-Net's
    ``-device cpu`` sets it to the core count) are restored after."""
    folders = {**prepared_nnunet(tmp_path_factory.getbasetemp() / "nnunet"), "nnUNet_results": results}
    results.mkdir()
    previous = set_nnunet_environment(folders)
    previous["RCPS_NNUNET_SETTINGS"] = os.environ.get("RCPS_NNUNET_SETTINGS")
    os.environ["RCPS_NNUNET_SETTINGS"] = json.dumps(settings)
    threads = torch.get_num_threads()
    try:
        yield folders
    finally:
        torch.set_num_threads(threads)
        restore_environment(previous)


def _write_raw(raw: Path, shape) -> None:
    from rcps_train.synthetic import make_synthetic_dataset, synthetic_case

    make_synthetic_dataset(raw, num_train=4, num_val=1, shape=shape, seed=3, layout="nnunet")
    rng = np.random.default_rng(7)
    (raw / "imagesUnlabeled").mkdir()
    for index in range(3):
        image, _ = synthetic_case(shape, rng)
        nib.save(nib.Nifti1Image(image, np.eye(4)), raw / "imagesUnlabeled" / f"unl_{index:03d}_0000.nii.gz")


def _shrink_networks(plans_file: Path) -> None:
    """A quarter of the planned widths, as a user may edit plans: a CPU step then takes a fraction of a second."""
    plans = json.loads(plans_file.read_text())
    for configuration in plans["configurations"].values():
        arch = configuration["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [max(4, width // 4) for width in arch["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=2))


def prepared_nnunet(root: Path, shape=SHAPE, shrink: bool = True, configurations=CONFIGURATIONS) -> dict[str, Path]:
    """The folders of the planned and preprocessed dataset (built on first use in this process).

    Args:
        root: where to build it.
        shape: the volume shape.
        shrink: quarter the planned network widths (fast CPU steps); False keeps nnU-Net's plans.
        configurations: the configurations to preprocess.

    Returns:
        ``{nnUNet_raw, nnUNet_preprocessed, nnUNet_results}`` (each test should use its own results folder).
    """
    key = (tuple(shape), shrink, tuple(configurations))
    if key in _PREPARED:
        return _PREPARED[key]
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    from rcps_nnunet.unlabeled import preprocess_unlabeled

    folders = {name: root / name for name in FOLDER_VARIABLES}
    for folder in folders.values():
        folder.mkdir(parents=True)
    _write_raw(folders["nnUNet_raw"] / DATASET, shape)
    previous = set_nnunet_environment(folders)
    # The planner passes this to torch.set_num_threads, which refuses 0 (training's in-process augmentation).
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
        plan_experiments([DATASET_ID])
        if shrink:
            _shrink_networks(folders["nnUNet_preprocessed"] / DATASET / "nnUNetPlans.json")
        processes = [1] * len(configurations)
        preprocess([DATASET_ID], configurations=configurations, num_processes=processes, show_progress_bar=False)
        preprocess_unlabeled(DATASET, list(configurations))
    finally:
        restore_environment(previous)
    split = [{"train": ["case_000", "case_001", "case_002"], "val": ["case_003"]}]
    (folders["nnUNet_preprocessed"] / DATASET / "splits_final.json").write_text(json.dumps(split))
    _PREPARED[key] = folders
    return folders


TINY_TRAINER = "nnUNetTrainerRCPS_tiny"
_TINY_TRAINER_SOURCE = '''"""nnUNetTrainerRCPS for tests: 1 epoch of 2 steps, 1 validation step, 50 negatives."""
import torch

from rcps_nnunet.trainer import nnUNetTrainerRCPS


class nnUNetTrainerRCPS_tiny(nnUNetTrainerRCPS):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 1
'''


def write_tiny_trainer(folder: Path) -> Path:
    """An ``nnUNet_extTrainer`` folder holding ``nnUNetTrainerRCPS_tiny`` (the way users add trainer variants)."""
    package = folder / "rcps_tiny_trainers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(_TINY_TRAINER_SOURCE)
    return folder
