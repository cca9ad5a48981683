"""TensorBoard logging of a run (``log.tensorboard = true``): every loss term, the learning rate, the ramp weight,
step time and peak memory per step, validation metrics per epoch, and at each validation a middle slice of one
case's image, label and prediction, in ``<run>/tensorboard/``.

Every value is logged at the global step (validation at the step that ended its epoch). A resumed run opens the
folder with ``purge_step`` = the first step it redoes, so TensorBoard drops what the interrupted attempt logged
after its checkpoint and each step appears once; the writer is flushed at every checkpoint, so nothing before
the checkpoint is lost with a kill.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from .config import ConfigError

# Per-step scalars: the train_log.csv column and its TensorBoard tag.
STEP_TAGS = {
    "loss": "loss/total",
    "lr": "schedule/lr",
    "ramp": "schedule/ramp",
    "step_time_s": "system/step_time_s",
    "peak_mem_mb": "system/peak_mem_mb",
}
VAL_METRICS = ("dice", "jaccard", "hd95", "asd")


def require_tensorboard() -> None:
    """Raise ConfigError before any work when ``log.tensorboard = true`` cannot be honoured."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "log.tensorboard = true needs the tensorboard package: pip install 'rcps-kernels[tensorboard]' "
            "(or set log.tensorboard = false)"
        )


def middle_slice(volume: np.ndarray) -> np.ndarray:
    """The middle slice across the last axis of a ``(D, H, W)`` volume (the through-plane axis of the LA and
    Pancreas patches)."""
    return volume[..., volume.shape[-1] // 2]


class TensorBoardLog:
    """A run's TensorBoard writer.

    Args:
        run_dir: the run folder; events go to ``run_dir / "tensorboard"``.
        purge_step: the first step a resumed run redoes (None for a fresh run).
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log_step(self, row: dict, terms: tuple[str, ...]) -> None:
        """The scalars of one ``train_log.csv`` row (terms the method does not use are NaN and skipped)."""
        step = row["global_step"]
        for key, tag in STEP_TAGS.items():
            self.writer.add_scalar(tag, row[key], step)
        for name in terms:
            if not math.isnan(row[name]):
                self.writer.add_scalar(f"loss/{name}", row[name], step)

    def log_validation(self, summary: dict, step: int, preview: tuple | None, num_classes: int) -> None:
        """Validation means at ``step``, and ``preview = (case, image, label, prediction)`` as three images.

        ``image`` is ``(C, D, H, W)`` (its first channel is shown), ``label`` and ``prediction`` ``(D, H, W)``
        (shown with class ``num_classes - 1`` white).
        """
        for name in VAL_METRICS:
            value = summary[name]
            if isinstance(value, float) and not math.isnan(value):
                self.writer.add_scalar(f"val/{name}", value, step)
        if preview is None:
            return
        case, image, label, prediction = preview
        picture = middle_slice(image[0])
        low, high = float(picture.min()), float(picture.max())
        classes = max(num_classes - 1, 1)
        for tag, array in (
            ("image", (picture - low) / max(high - low, 1e-8)),
            ("label", middle_slice(label) / classes),
            ("prediction", middle_slice(prediction) / classes),
        ):
            self.writer.add_image(f"val_{case}/{tag}", array.astype(np.float32), step, dataformats="HW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
