"""The files of a run folder that let a run stop and continue: checkpoints (written atomically, read with
checks, holding every RNG stream) and the CSV logs (appended row by row, cut back to a checkpoint on resume).

The checkpoint format lives here alone. Every checkpoint holds ``model`` (the weights), ``in_channels``,
``preprocessing`` (the plan of ``rcps-train prepare``, or None) and ``config`` (what ``eval`` and ``predict``
need); ``checkpoint.pt`` adds :data:`RESUME_ENTRIES` and ``data`` (the state a ``--resume`` continues from) and
``best.pt`` adds :data:`BEST_ENTRIES` (which validation made it the best). Checkpoints written before
multi-channel data lack ``in_channels`` (they are 1-channel), before ``prepare`` ``preprocessing``, and before the
data record ``data``.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, load_config, resume_changes
from .data import data_changes
from .files import read_json, replace_atomically, write_csv_atomic, write_text_atomic
from .model import ProjectorUNet, build_model
from .run import TrainingRun

BEST_ENTRIES = ("epoch", "val_dice", "val_cases")
RESUME_ENTRIES = (
    "model",
    "optimizer",
    "scaler",
    "epoch",
    "step_in_epoch",
    "global_step",
    "rng",
    "val_history",
    "config",
)
# Files a run writes into its folder; a fresh run (no checkpoint.pt) removes any left by an earlier attempt.
RUN_FILES = (
    "config.toml",
    "train_log.csv",
    "val_log.csv",
    "best.pt",
    "best.pt.tmp",
    "checkpoint.pt.tmp",
    "metrics.csv",
    "metrics_best.csv",
    "metrics.json",
    "loss_terms.png",
    "val_dice.png",
)


# A fresh run refuses a folder holding any of these without checkpoint.pt (a finished run whose checkpoint was
# removed, or weights): they are what a user keeps, so only --overwrite replaces them.
FINISHED_FILES = ("best.pt", "metrics.json", "metrics.csv", "metrics_best.csv")


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` that never leaves half a file behind."""
    replace_atomically(path, lambda f: torch.save(state, f), "wb")


def _weights(run: TrainingRun) -> dict:
    """The entries every checkpoint of ``run`` holds: its network's weights and what predicting with them needs."""
    return {
        "model": run.raw_model.state_dict(),
        "in_channels": run.splits.channels,
        "preprocessing": run.preprocessing,
        "config": run.config,
    }


def save_checkpoint(run: TrainingRun) -> None:
    """Write ``checkpoint.pt`` (main process) with the state to continue ``run`` from its next step, including
    every rank's RNG streams, so that each resumes its own. Every rank must call it (the streams are gathered).

    Args:
        run: the training run, at the position its next step starts from.
    """
    rng = rng_states(run.generators)
    if run.world_size > 1:
        gathered = [None] * run.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if not run.main:
        return
    if run.tensorboard is not None:  # events up to this checkpoint survive a kill
        run.tensorboard.flush()
    state = {
        **_weights(run),
        "data": run.data,
        "optimizer": run.step.optimizer.state_dict(),
        "scaler": run.step.scaler.state_dict(),
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "global_step": run.global_step,
        "rng": rng,
        "val_history": run.val_history,
    }
    save_atomic(state, run.run_dir / "checkpoint.pt")


def save_best(run: TrainingRun, val_dice: float, val_cases: list[str]) -> None:
    """Write ``best.pt``: ``run``'s current weights, after the validation that found them the best so far.

    Args:
        run: the training run; ``run.epoch`` counts the epochs done.
        val_dice: their mean validation Dice.
        val_cases: the names of the validation cases scored.
    """
    state = {**_weights(run), "epoch": run.epoch, "val_dice": val_dice, "val_cases": val_cases}
    save_atomic(state, run.run_dir / "best.pt")


def restore_checkpoint(run: TrainingRun, state: dict) -> None:
    """Continue ``run`` from a ``checkpoint.pt`` (see :func:`checkpoint_to_resume`): its weights, optimizer,
    scaler, position, validation history and RNG streams, after checking that the data still fits it.

    Args:
        run: a freshly set-up run of the same config.
        state: the checkpoint's entries.

    Raises:
        ConfigError: the images have another channel count, or the data changed since the checkpoint.
    """
    path = run.run_dir / "checkpoint.pt"
    stored_channels = checkpoint_channels(state)
    if stored_channels != run.splits.channels:
        raise ConfigError(
            f"--resume: {path} was trained on {stored_channels}-channel images but the images under "
            f"data.root = {run.config['data']['root']!r} have {run.splits.channels} channel(s)"
        )
    changes = data_changes(state["data"], run.data) if "data" in state else []
    if changes:
        raise ConfigError(
            f"--resume: the data under data.root = {run.config['data']['root']!r} changed since "
            f"{path} was written ({'; '.join(changes)}); restore it or start a new run.name"
        )
    run.raw_model.load_state_dict(state["model"])
    run.step.optimizer.load_state_dict(state["optimizer"])
    run.step.scaler.load_state_dict(state["scaler"])
    run.epoch, run.step_in_epoch, run.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
    run.val_history = state["val_history"]
    restore_rng(state["rng"][run.rank] if isinstance(state["rng"], list) else state["rng"], run.generators)


def load_best(run: TrainingRun) -> tuple[ProjectorUNet, dict] | None:
    """The network of ``run``'s ``best.pt`` and the file's other entries, or None when there is no such file.

    Args:
        run: the training run (its config builds the network, on its device).

    Returns:
        ``(model, state)``: the weights loaded into a network in the config's layout, and the file's entries.
    """
    path = run.run_dir / "best.pt"
    if not path.exists():
        return None
    state = load_checkpoint(path, run.device, ("model", *BEST_ENTRIES))
    model = build_model(run.config, checkpoint_channels(state), run.device)
    model.load_state_dict(state["model"])
    return model, state


def checkpoint_channels(state: dict) -> int:
    """The image channels a checkpoint's network takes (1 for checkpoints written before the entry existed)."""
    return state.get("in_channels", 1)


def load_trained_model(path: str | Path, overrides: list[str] = ()) -> tuple[ProjectorUNet, dict, dict]:
    """A checkpoint's network with its weights, for scoring or prediction.

    Args:
        path: ``checkpoint.pt`` or ``best.pt`` of a run.
        overrides: ``key=value`` strings applied over the stored config (e.g. another ``eval.protocol``).

    Returns:
        ``(model, config, state)``: the network on the CPU in its config's layout, the stored config resolved
        (keys it lacks take their defaults) with ``overrides``, and the file's entries.

    Raises:
        ConfigError: naming the file when it is missing, not a checkpoint, or its weights do not fit its config.
    """
    config, state = load_trained_config(path, overrides)
    return trained_model(path, config, state), config, state


def load_trained_config(path: str | Path, overrides: list[str] = ()) -> tuple[dict, dict]:
    """The first half of :func:`load_trained_model`: ``(config, state)`` without building the network, for callers
    that check more (an output folder) before that work."""
    path = Path(path)
    state = load_checkpoint(path, "cpu", ("model", "config"))
    config = load_config(None, overrides, base=state["config"], base_source=f"checkpoint {path} (its stored config)")
    return config, state


def trained_model(path: str | Path, config: dict, state: dict) -> ProjectorUNet:
    """The second half of :func:`load_trained_model`: the network of ``config`` holding ``state``'s weights."""
    model = build_model(config, checkpoint_channels(state))
    check_weights_fit(model, state["model"], config, Path(path))
    model.load_state_dict(state["model"])
    return model


def check_output_folder(folder: Path, what: str) -> None:
    """Raise ConfigError before any work when ``folder`` cannot hold output: a file is in its place, or it (or
    the nearest existing folder above it) is not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is a file, not a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {folder}: {existing} is not writable")


def check_fresh_run_folder(run_dir: Path, overwrite: bool) -> None:
    """A fresh run (no checkpoint.pt to resume) may replace what a killed attempt left, but not a finished
    run's results or weights unless ``overwrite`` says so."""
    check_output_folder(run_dir, "run folder")
    # A torn JSON file (a kill while an older version wrote it in place) counts as not written.
    kept = [
        name
        for name in FINISHED_FILES
        if (run_dir / name).exists() and (not name.endswith(".json") or read_json(run_dir / name) is not None)
    ]
    if kept and not overwrite:
        raise ConfigError(
            f"run folder {run_dir} holds {', '.join(kept)} of an earlier run (and no checkpoint.pt to resume): "
            f"choose another run.name, or pass --overwrite to replace them"
        )


def load_checkpoint(path: str | Path, map_location, entries: tuple[str, ...]) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` or :func:`save_best`.

    Args:
        path: the file.
        map_location: passed to ``torch.load``.
        entries: keys the caller needs (``model``, ``config``, ...).

    Raises:
        ConfigError: naming the file when it is missing, unreadable or not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # pickle and zip readers raise many types for foreign or truncated files
        raise ConfigError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(entry in state for entry in entries):
        found = f"entries {sorted(map(str, state))}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ConfigError(
            f"{path} is not an rcps-train checkpoint: expected a dict with entries {', '.join(entries)}, found {found}"
        )
    return state


def check_weights_fit(model: torch.nn.Module, weights: dict, config: dict, path: str | Path) -> None:
    """Raise ConfigError naming ``path`` when ``weights`` do not fit ``model`` (built from ``config``)."""
    expected = model.state_dict()
    if not isinstance(weights, dict):
        raise ConfigError(f"checkpoint {path}: 'model' holds a {type(weights).__name__}, expected a state dict")
    shapes = {name: tuple(getattr(value, "shape", ())) for name, value in weights.items()}
    head = f"heads.{len(model.heads) - 1}.weight"
    if head in shapes and shapes[head][:1] != expected[head].shape[:1]:
        raise ConfigError(
            f"checkpoint {path} holds weights for {shapes[head][0]} classes ({head} of shape "
            f"{shapes[head]}) but its config has data.num_classes = {config['data']['num_classes']}"
        )
    wrong = sorted(set(expected) ^ set(shapes)) + [
        name for name in expected if name in shapes and shapes[name] != tuple(expected[name].shape)
    ]
    if wrong:
        raise ConfigError(
            f"checkpoint {path}: its weights do not fit the model of its config (model.widths = "
            f"{config['model']['widths']}, model.project_dim = {config['model']['project_dim']}); "
            f"first differing entries: {wrong[:3]}"
        )


def checkpoint_to_resume(
    config: dict, checkpoint_path: Path, resume: bool, main: bool, device: torch.device
) -> dict | None:
    """The checkpoint a ``--resume`` continues, after checking that its config matches ``config``; None for a
    new run, whose folder must not hold a checkpoint yet."""
    if main and checkpoint_path.exists() and not resume:
        raise ConfigError(f"{checkpoint_path} exists: pass --resume to continue it, or choose another run.name")
    if not resume:
        return None
    if not checkpoint_path.exists():
        raise ConfigError(f"--resume: no checkpoint at {checkpoint_path}")
    state = load_checkpoint(checkpoint_path, device, RESUME_ENTRIES)
    allowed_changes = resume_changes(state["config"], config, str(checkpoint_path))
    if main and allowed_changes:
        print(
            f"--resume with changed keys that leave the run as it was: {'; '.join(allowed_changes)} "
            f"(written to {checkpoint_path.parent / 'config.toml'})"
        )
    return state


def start_clean(run_dir: Path) -> None:
    """A fresh run in a folder without a checkpoint: remove what an earlier attempt (killed before its first
    checkpoint) left, so that the logs never mix two runs."""
    stale = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    for path in stale:
        path.unlink()
    if (run_dir / "tensorboard").is_dir():  # its events would interleave with the new run's
        shutil.rmtree(run_dir / "tensorboard")
        stale.append(run_dir / "tensorboard")
    if stale:
        print(
            f"rcps-train: {run_dir} had no checkpoint; removed the files of an earlier attempt: "
            + ", ".join(p.name for p in stale)
        )


def rng_states(generators: dict[str, torch.Generator]) -> dict:
    """Every random stream of this process (global torch/numpy/python/CUDA and ``generators``), to checkpoint."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        **{name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict, generators: dict[str, torch.Generator]) -> None:
    """Put back the streams :func:`rng_states` recorded."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    for name, g in generators.items():
        g.set_state(states[name])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """Append ``row`` to the CSV log ``path``, writing the header first when the file is new or empty."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_log(path: Path, key: str, last: int) -> None:
    """Drop log rows written after the checkpoint a resumed run restarts from (they will be redone).

    A row cut short by a kill (missing fields, an unreadable ``key``) can only come after the checkpoint,
    since a row is complete on disk before the checkpoint that follows it is written: it is dropped too.
    """
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        rows = [row for row in reader if _complete_row_at_most(row, key, last)]
    if fields:
        write_csv_atomic(path, fields, rows)
    else:
        write_text_atomic(path, "")


def _complete_row_at_most(row: dict, key: str, last: int) -> bool:
    """Whether a CSV row has every field (no torn line) and ``row[key] <= last``."""
    if None in row or None in row.values():  # csv marks missing fields with None values, extra ones with a None key
        return False
    try:
        return int(row.get(key, "")) <= last
    except ValueError:
        return False
