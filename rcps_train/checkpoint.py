"""The files of a run folder that let a run stop and continue: checkpoints (written atomically, read with
checks, holding every RNG stream) and the CSV logs (appended row by row, cut back to a checkpoint on resume).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, resume_changes
from .files import read_json, replace_atomically, write_csv_atomic, write_text_atomic

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
    """Read a checkpoint written by :func:`rcps_train.engine.train`.

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
