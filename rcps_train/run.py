"""The state of one training run, shared by the loop (engine.py) and the checkpoint format (checkpoint.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import PairedPatchDataset, Splits
from .model import ProjectorUNet
from .step import StepContext
from .tensorboard_log import TensorBoardLog


@dataclass
class TrainingRun:
    """What a training run carries from step to step: where it runs, what it trains, and how far it got.

    ``epoch``/``step_in_epoch`` always name the next step to take (the position a checkpoint resumes from).
    """

    config: dict
    device: torch.device
    rank: int
    world_size: int
    run_dir: Path
    splits: Splits
    dataset: PairedPatchDataset
    raw_model: ProjectorUNet  # what is saved, validated and tested
    step: StepContext  # what each step uses: its model is the DDP wrapper in a distributed run
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    val_history: list[dict] = field(default_factory=list)
    tensorboard: TensorBoardLog | None = None  # main process with log.tensorboard only
    preprocessing: dict | None = None  # data.root's preprocessing.json (rcps-train prepare), saved with the weights
    data: dict = field(default_factory=dict)  # the data the run started with (data_record), checked on --resume

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run folder."""
        return self.rank == 0

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The run's own random streams by name, as checkpoints store them: ``augment`` (intensity views) and
        ``negatives`` (random sampling)."""
        return {"augment": self.step.augment_generator, "negatives": self.step.negative_generator}
