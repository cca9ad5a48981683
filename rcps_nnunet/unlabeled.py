"""Unlabeled cases for nnU-Net: ``imagesUnlabeled/`` in the raw dataset, preprocessed with the labeled plans.

Layout: ``$nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/<case>_<channel><file_ending>``, the channel naming of
``imagesTr`` (``_0000``, ``_0001``, ... for the ``channel_names`` of dataset.json). Each case is preprocessed by
the plans' preprocessor (crop, resample, normalise with the labeled fingerprint's statistics) without a
segmentation, into ``$nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/``, next to (never inside)
the labeled cases' folder, so re-running nnU-Net's preprocessing leaves it alone. nnU-Net's data loader reads
``class_locations`` from every case: unlabeled cases get an empty one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
from pathlib import Path

from .environment import NnUNetSetupError, check_nnunet_version, require_folders

UNLABELED_RAW_FOLDER = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"


def unlabeled_folder(preprocessed_dataset_folder: str | Path, data_identifier: str) -> Path:
    """Where the preprocessed unlabeled cases of one configuration live."""
    return Path(preprocessed_dataset_folder) / f"{data_identifier}{UNLABELED_SUFFIX}"


def stamp_file(folder: Path) -> Path:
    """Written last, next to the folder (nnU-Net infers the case format from the files inside): which plans made
    it, so the trainer refuses a stale folder."""
    return folder.with_name(folder.name + ".json")


#: The configuration keys preprocessing depends on (the architecture and batch size may change freely).
PREPROCESSING_KEYS = (
    "data_identifier",
    "preprocessor_name",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_data_kwargs",
)


def plans_digest(plans: dict, configuration: str) -> str:
    """A digest of what preprocessing depends on: the configuration's preprocessing keys, the transpose and the
    labeled fingerprint's intensity statistics.

    Args:
        plans: the plans dict.
        configuration: the configuration name.

    Returns:
        A hex digest.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    resolved = manager.get_configuration(configuration).configuration
    relevant = {
        "configuration": {key: resolved.get(key) for key in PREPROCESSING_KEYS},
        "intensity": manager.foreground_intensity_properties_per_channel,
        "transpose_forward": manager.transpose_forward,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def list_unlabeled_cases(raw_dataset_folder: Path, dataset_json: dict) -> dict[str, list[str]]:
    """The unlabeled cases and their channel files, checked against dataset.json's channels.

    Args:
        raw_dataset_folder: ``$nnUNet_raw/DatasetXXX_Name``.
        dataset_json: its dataset.json.

    Returns:
        ``{case: [channel files in channel order]}``, sorted by case.
    """
    folder = raw_dataset_folder / UNLABELED_RAW_FOLDER
    ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if not folder.is_dir():
        raise NnUNetSetupError(
            f"{folder} does not exist: put the unlabeled images there, named like imagesTr "
            f"(<case>_0000{ending}, one file per channel)"
        )
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    cases: dict[str, dict[int, str]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None:
            raise NnUNetSetupError(f"{path} is not named <case>_<4-digit channel>{ending} like the files of imagesTr")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = str(path)
    if not cases:
        raise NnUNetSetupError(f"{folder} holds no images (<case>_0000{ending})")
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            raise NnUNetSetupError(
                f"unlabeled case {case!r} in {folder} has channels {sorted(channels)}; dataset.json lists "
                f"{num_channels} (_0000 to _{num_channels - 1:04d})"
            )
    return {case: [channels[c] for c in range(num_channels)] for case, channels in sorted(cases.items())}


def _preprocess_case(job: tuple) -> None:
    """Preprocess and save one case (a module-level function, so spawned workers can run it)."""
    output_truncated, image_files, plans, configuration, dataset_json = job
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = _without_segmentation(configuration_manager.preprocessor_class)(verbose=False)
    preprocessor.run_case_save(output_truncated, image_files, None, plans_manager, configuration_manager, dataset_json)


def _without_segmentation(preprocessor_class: type) -> type:
    """The plans' preprocessor class, reading no segmentation and recording no foreground locations."""

    class UnlabeledPreprocessor(preprocessor_class):
        def run_case(self, image_files, seg_file, plans_manager, configuration_manager, dataset_json):
            data, seg, properties = super().run_case(
                image_files, None, plans_manager, configuration_manager, dataset_json
            )
            properties["class_locations"] = {}  # the loader reads it; random crops never use it
            return data, seg, properties

    return UnlabeledPreprocessor


def _dataset_plans(dataset: str, plans_identifier: str) -> tuple[str, Path, dict]:
    """``(dataset name, its preprocessed folder, its plans)``, with advice when the plans are missing."""
    check_nnunet_version()
    folders = require_folders("nnUNet_raw", "nnUNet_preprocessed")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as err:
        raise NnUNetSetupError(f"dataset {dataset!r}: {err}") from None
    preprocessed = folders["nnUNet_preprocessed"] / dataset_name
    plans_file = preprocessed / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise NnUNetSetupError(
            f"{plans_file} does not exist: plan and preprocess the labeled cases first "
            f"(nnUNetv2_plan_and_preprocess -d {dataset})"
        )
    return dataset_name, preprocessed, json.loads(plans_file.read_text())


def preprocessed_configurations(dataset: str, plans_identifier: str = "nnUNetPlans") -> list[str]:
    """The non-cascade configurations of the plans whose labeled cases are preprocessed.

    Args:
        dataset: dataset name or ID.
        plans_identifier: the plans file name without ``.json``.

    Returns:
        Configuration names (sorted).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    _, preprocessed, plans = _dataset_plans(dataset, plans_identifier)
    manager = PlansManager(plans)
    found = []
    for name in sorted(plans["configurations"]):
        config = manager.get_configuration(name)
        if config.previous_stage_name is None and (preprocessed / config.data_identifier).is_dir():
            found.append(name)
    if not found:
        raise NnUNetSetupError(f"no configuration of {plans_identifier} is preprocessed in {preprocessed}")
    return found


def preprocess_unlabeled(
    dataset: str, configurations: list[str], plans_identifier: str = "nnUNetPlans", num_processes: int = 1
) -> dict[str, Path]:
    """Preprocess ``imagesUnlabeled/`` for each configuration with the labeled dataset's plans.

    Args:
        dataset: dataset name (``DatasetXXX_Name``) or ID.
        configurations: e.g. ``["3d_fullres", "2d"]``.
        plans_identifier: the plans file name without ``.json``.
        num_processes: worker processes (1: in this process).

    Returns:
        ``{configuration: output folder}``.
    """
    dataset_name, preprocessed, plans = _dataset_plans(dataset, plans_identifier)
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    unknown = [c for c in configurations if c not in plans["configurations"]]
    if unknown:
        raise NnUNetSetupError(
            f"{plans_identifier}.json has no configuration {unknown}; it has {sorted(plans['configurations'])}"
        )
    cases = list_unlabeled_cases(require_folders("nnUNet_raw")["nnUNet_raw"] / dataset_name, dataset_json)
    return {
        configuration: _preprocess_configuration(plans, configuration, dataset_json, cases, preprocessed, num_processes)
        for configuration in configurations
    }


def _preprocess_configuration(
    plans: dict,
    configuration: str,
    dataset_json: dict,
    cases: dict[str, list[str]],
    preprocessed: Path,
    num_processes: int,
) -> Path:
    """Write one configuration's unlabeled folder (rebuilt from scratch) and its stamp."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    if config.previous_stage_name is not None:
        raise NnUNetSetupError(
            f"configuration {configuration!r} is a cascade stage: unlabeled cases have no previous-stage "
            "segmentation (use 3d_fullres, 3d_lowres or 2d)"
        )
    output = unlabeled_folder(preprocessed, config.data_identifier)
    stamp_file(output).unlink(missing_ok=True)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    jobs = [(str(output / case), files, plans, configuration, dataset_json) for case, files in cases.items()]
    if num_processes <= 1:
        for job in jobs:
            _preprocess_case(job)
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            pool.map(_preprocess_case, jobs)
    stamp = {"plans_digest": plans_digest(plans, configuration), "configuration": configuration, "cases": len(jobs)}
    stamp_file(output).write_text(json.dumps(stamp, indent=2))
    print(f"preprocessed {len(jobs)} unlabeled cases for {configuration} into {output}")
    return output


def check_unlabeled_folder(folder: Path, plans: dict, configuration: str, dataset: str) -> None:
    """Raise unless ``folder`` holds unlabeled cases preprocessed with these plans.

    Args:
        folder: from :func:`unlabeled_folder`.
        plans: the plans the trainer uses.
        configuration: its configuration name.
        dataset: the dataset name, for the advice.
    """
    command = f"rcps-nnunet preprocess-unlabeled {dataset} -c {configuration}"
    stamp_path = stamp_file(folder)
    if not stamp_path.is_file():
        raise NnUNetSetupError(f"no preprocessed unlabeled cases in {folder}: run `{command}` first")
    stamp = json.loads(stamp_path.read_text())
    if stamp.get("plans_digest") != plans_digest(plans, configuration):
        raise NnUNetSetupError(
            f"the unlabeled cases in {folder} were preprocessed with other plans than this training uses: "
            f"run `{command}` again"
        )
