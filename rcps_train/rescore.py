"""``rcps-train eval``: score a saved model again, under any protocol, split or data root, into a folder of its
own, so that re-scores never overwrite each other or the run's own ``metrics.json``.

The default folder, beside the checkpoint, is named after everything that decides the numbers:
``eval-<checkpoint>-<protocol>-<split>-lcc-<on|off>-<data>`` (``<data>``: a short hash of the data root and
format). ``metrics.json`` records the same in full; an explicit ``--out`` that holds another re-score's metrics is
refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .checkpoint import check_output_folder, load_trained_config, trained_model
from .config import ConfigError
from .data import dataset_channels
from .engine import resolve_device
from .evaluate import eval_settings, evaluate_cases, format_table, write_metrics
from .files import read_json
from .layouts import DataError, list_cases

IDENTITY = ("checkpoint", "checkpoint_epoch", "split", "data_root", "data_format", "protocol", "largest_component")


def rescore_identity(path: Path, state: dict, config: dict, split: str) -> dict:
    """Everything that decides a re-score's numbers (the ``metrics.json`` keys of :data:`IDENTITY`)."""
    return {
        "checkpoint": str(path.resolve()),
        "checkpoint_epoch": state.get("epoch"),
        "split": split,
        "data_root": str(Path(config["data"]["root"]).resolve()),
        "data_format": config["data"]["format"],
        "protocol": config["eval"]["protocol"],
        "largest_component": eval_settings(config)[3],
    }


def default_folder(identity: dict) -> Path:
    data = hashlib.sha1(f"{identity['data_root']}|{identity['data_format']}".encode()).hexdigest()[:8]
    name = Path(identity["checkpoint"]).stem
    lcc = "on" if identity["largest_component"] else "off"
    return (
        Path(identity["checkpoint"]).parent / f"eval-{name}-{identity['protocol']}-{identity['split']}-lcc-{lcc}-{data}"
    )


def check_out_folder(out: Path, identity: dict) -> None:
    """Refuse ``out`` when it is not a writable folder or holds the metrics of another re-score."""
    check_output_folder(out, "--out")
    earlier = read_json(out / "metrics.json")  # torn or absent: nothing to keep
    if earlier is not None and {key: earlier.get(key) for key in IDENTITY} != identity:
        differing = [key for key in IDENTITY if earlier.get(key) != identity[key]]
        raise ConfigError(
            f"--out {out} holds the metrics of another scoring (differing in {', '.join(differing)}); "
            f"choose another --out or leave it out for a folder of its own"
        )


def rescore(
    checkpoint: str | Path,
    protocol: str | None = None,
    largest_component: str | None = None,
    data: str | None = None,
    split: str = "val",
    out: str | Path | None = None,
) -> Path:
    """Score a checkpoint on a split and write ``metrics.csv`` / ``metrics.json``.

    Args:
        checkpoint: ``checkpoint.pt`` or ``best.pt`` of a run.
        protocol, largest_component: override the checkpoint's ``eval.protocol`` / ``eval.largest_component``.
        data: another data root (default: the checkpoint's).
        split: ``"val"`` (the test split) or ``"train"``.
        out: the output folder (default: :func:`default_folder`).

    Returns:
        The folder written.
    """
    path = Path(checkpoint)
    overrides = [
        f'eval.{key}="{value}"'
        for key, value in (("protocol", protocol), ("largest_component", largest_component))
        if value
    ]
    config, state = load_trained_config(path, overrides)
    if data:
        config["data"]["root"] = data
    identity = rescore_identity(path, state, config, split)
    out = Path(out) if out else default_folder(identity)
    check_out_folder(out, identity)
    model = trained_model(path, config, state)
    cases = list_cases(config["data"]["root"], split, config["data"]["format"])
    channels = dataset_channels(cases)
    if channels != model.in_channels:
        raise DataError(
            f"checkpoint {path} was trained on {model.in_channels}-channel images but the {split} images under "
            f"{config['data']['root']} have {channels} channel(s)"
        )
    device = resolve_device(config)
    model.to(device)  # build_model chose the layout; moving keeps it
    rows, summary = evaluate_cases(model, cases, config, device)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(rows, summary, out, identity)
    print(format_table(rows, summary))
    return out
