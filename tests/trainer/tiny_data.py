"""Tiny synthetic data and run settings shared by the trainer tests: runs that take seconds."""

from rcps_train import engine
from rcps_train.synthetic import make_synthetic_dataset

SHAPE = (32, 32, 24)


def tiny_dataset(root, num_train=4, num_val=2):
    """A small synthetic NIfTI dataset shared by the trainer tests."""
    return make_synthetic_dataset(root, num_train, num_val, SHAPE, seed=0)


def tiny_overrides(data_root, out_dir, **extra):
    """Config overrides for a run that takes seconds: width 4, 16x16x16 patches, 2 steps per epoch."""
    values = {
        "data.root": f'"{data_root}"',
        "run.out_dir": f'"{out_dir}"',
        "data.labeled": 1,
        "data.val_cases": 1,
        "data.patch_size": "[16, 16, 16]",
        "data.num_workers": 0,
        "model.widths": "[4, 8, 8, 16, 16]",
        "model.project_dim": 16,
        "train.epochs": 2,
        "train.max_steps_per_epoch": 2,
        "train.warmup_epochs": 1,
        "train.progress": "false",
        "loss.num_negatives": 16,
        "eval.every_epochs": 1,
        "eval.overlap": 0.5,
        "data.grid_distortion_prob": 0.5,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def die_at_step(monkeypatch, number):
    """Make the ``number``-th training step raise KeyboardInterrupt (a kill); returns the real step function."""
    real_step, calls = engine.train_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", dying_step)
    return real_step
