"""The RCPS terms in nnU-Net's logger: declared keys, per-epoch means, and a progress plot of their own."""

from __future__ import annotations

import matplotlib
import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)

from rcps_train.losses import TERMS  # noqa: E402

#: Logged once per epoch as ``rcps_<name>``: the epoch means of the terms and the ramp-up weight.
LOGGED_TERMS = (*TERMS, "ramp")
PLOT_FILE = "progress_rcps.png"


def epoch_means(outputs: list[dict], names) -> dict[str, float]:
    """The mean of each named value over an epoch's ``train_step`` outputs."""
    return {name: float(np.mean([output[name] for output in outputs])) for name in names}


class RCPSLocalLogger(LocalLogger):
    """nnU-Net's local logger with the RCPS terms declared; its plot adds ``progress_rcps.png``."""

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for name in LOGGED_TERMS:
            self.my_fantastic_logging[f"rcps_{name}"] = []

    def plot_progress_png(self, output_folder: str) -> None:
        """nnU-Net's ``progress.png``, then ``progress_rcps.png``: L_seg, the unlabeled terms and the ramp-up."""
        super().plot_progress_png(output_folder)
        logged = self.my_fantastic_logging
        epochs = range(min(len(values) for values in logged.values()))
        figure, axes = plt.subplots(3, 1, figsize=(15, 20))
        # nnU-Net's Dice+CE is negative (it subtracts the Dice), so it gets its own panel.
        panels = (
            (axes[0], ("seg",), "nnU-Net Dice+CE"),
            (axes[1], TERMS[1:], "RCPS term"),
            (axes[2], ("ramp",), "ramp-up weight"),
        )
        for axis, names, ylabel in panels:
            for name in names:
                axis.plot(epochs, logged[f"rcps_{name}"][: len(epochs)], label=name, linewidth=2)
            axis.set(xlabel="epoch", ylabel=f"{ylabel} (epoch mean)")
            axis.legend(loc="upper right")
        figure.tight_layout()
        figure.savefig(f"{output_folder}/{PLOT_FILE}")
        plt.close(figure)
