"""What ``rcps-nnunet`` needs from the machine: an nnunetv2 release in the tested range, nnU-Net's folder variables,
and the folder that nnU-Net searches for ``nnUNetTrainerRCPS``.

Nothing here imports nnunetv2, so these checks run (and explain themselves) before nnU-Net's own import-time
messages or tracebacks can appear.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

#: The nnunetv2 releases this integration is tested with (``[low, high)``), as in the ``nnunet`` extra.
TESTED_NNUNET_RANGE = ((2, 8), (2, 9))
NNUNET_REQUIREMENT = "nnunetv2>=2.8,<2.9"

#: nnU-Net's folder variables (read by nnunetv2 at call time).
FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

#: nnU-Net scans every module of each folder listed in this variable (``os.pathsep``-separated) for trainer classes.
EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"

#: The folder that holds only the trainer package: nnU-Net imports everything it finds there.
TRAINER_FOLDER = Path(__file__).resolve().parent / "ext_trainers"


class NnUNetSetupError(RuntimeError):
    """nnunetv2 is missing or untested, a folder variable is unset, or the data is not where it must be."""


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``2.8.1`` or ``2.8.0rc1``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise NnUNetSetupError(f"cannot read the installed nnunetv2 version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_nnunet_version(version: str | None = None) -> str:
    """Raise unless nnunetv2 is installed in the tested range.

    Args:
        version: the version to judge; None reads the installed distribution's.

    Returns:
        The installed version string.
    """
    if version is None:
        try:
            version = importlib.metadata.version("nnunetv2")
        except importlib.metadata.PackageNotFoundError:
            raise NnUNetSetupError(
                f'nnunetv2 is not installed: pip install "rcps-kernels[nnunet]" (it pins {NNUNET_REQUIREMENT})'
            ) from None
    low, high = TESTED_NNUNET_RANGE
    if not low <= _release(version) < high:
        raise NnUNetSetupError(
            f"nnunetv2 {version} is installed, but nnUNetTrainerRCPS is tested with {NNUNET_REQUIREMENT} "
            f'(its trainer hooks change between releases): pip install "{NNUNET_REQUIREMENT}"'
        )
    return version


def require_folders(*names: str) -> dict[str, Path]:
    """Raise unless every named nnU-Net folder variable is set to an existing folder.

    Args:
        names: variables out of :data:`FOLDER_VARIABLES`.

    Returns:
        ``{name: folder}``.
    """
    unset = [name for name in names if not os.environ.get(name)]
    if unset:
        raise NnUNetSetupError(
            f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: nnU-Net reads its data and results "
            f"from {', '.join(FOLDER_VARIABLES)} (export each as a folder path; see nnU-Net's setting_up_paths.md)"
        )
    folders = {name: Path(os.environ[name]) for name in names}
    missing = [f"{name}={folder}" for name, folder in folders.items() if not folder.is_dir()]
    if missing:
        raise NnUNetSetupError(f"these nnU-Net folders do not exist: {', '.join(missing)}")
    return folders


def with_trainer_folder(current: str | None) -> str:
    """The ``nnUNet_extTrainer`` value that lists :data:`TRAINER_FOLDER` first and keeps the user's folders.

    Args:
        current: the variable's present value (None or empty: unset).

    Returns:
        The new value.
    """
    folders = [folder for folder in (current or "").split(os.pathsep) if folder.strip()]
    if str(TRAINER_FOLDER) in folders:
        return os.pathsep.join(folders)
    return os.pathsep.join([str(TRAINER_FOLDER), *folders])


def export_trainer_folder() -> None:
    """Point ``nnUNet_extTrainer`` at :data:`TRAINER_FOLDER` for this process and the processes it starts."""
    os.environ[EXT_TRAINER_VARIABLE] = with_trainer_folder(os.environ.get(EXT_TRAINER_VARIABLE))
