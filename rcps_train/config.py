"""Run configuration: nested defaults, TOML files (stdlib ``tomllib``), ``--set key=value`` overrides, checks.

Every knob of a run lives in :data:`DEFAULTS`; a TOML file overrides any subset of it. Unknown keys and values
of the wrong type are errors that name the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import difflib
import importlib.resources
import tomllib
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {
        "name": "rcps",
        "out_dir": "runs",  # the run folder is <out_dir>/<name>
        "seed": 42,
        "device": "auto",  # "auto" | "cpu" | "cuda"
    },
    "data": {
        "format": "nifti",  # "nifti": <root>/{train,val}_{images,labels}/<name>.nii.gz; "h5": UA-MT/MC-Net layout;
        # "nnunet": nnU-Net v2 raw (dataset.json, imagesTr/labelsTr, imagesTs/labelsTs)
        "root": "",
        "labeled": 8,  # int: the first N of the sorted training list; str: a file of IDs, one a line
        # Validation split for eval.every_epochs and best.pt, taken from the training cases that are NOT labeled
        # (their labels only score): int: the last N of them (0: none); str: a file of IDs, one a line
        "val_cases": 0,
        "num_classes": 2,
        "patch_size": [112, 112, 80],
        "num_workers": 2,
        "cache": True,  # keep every (normalised) volume in memory after the start-up check
        "grid_distortion_prob": 0.1,
        "grid_distortion_limit": 0.1,
        "grid_distortion_cells": 5,
    },
    "model": {
        "widths": [16, 32, 64, 128, 256],
        "project_dim": 64,
        "checkpointing": False,  # recompute the U-Net blocks in backward (saves most activation memory)
        "channels_last": False,  # channels_last_3d layout (lower CPU peak memory at large patches)
    },
    "train": {
        "method": "rcps",  # "rcps" | "supervised" (L_seg on the labeled cases only, everything else equal)
        "epochs": 100,  # one epoch = one pass over the unlabeled cases; also the ramp-up length
        "max_steps_per_epoch": 0,  # 0: the whole pass; >0 caps it (short demos and tests)
        "batch_size": 1,  # labeled and unlabeled patches per step and device
        "lr": 0.01,
        "warmup_epochs": 5,
        "warmup_lr": 1e-4,
        "poly_power": 0.9,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "amp": "auto",  # "auto" (fp16 + GradScaler on CUDA, off on CPU) | "off" | "fp16" | "bf16"
        "checkpoint_every": 100,  # steps between checkpoints (also written at every epoch end)
        "stop_after_steps": 0,  # >0: checkpoint and stop after this global step (time-limited jobs, tests)
        "progress": True,  # tqdm bars
    },
    "loss": {
        "alpha": 0.1,  # weight of L_urp + L_cr (0.2 for Pancreas)
        "beta": 0.1,  # weight of L_bc
        "tau": 0.1,  # InfoNCE temperature
        "sharpen_temperature": 0.5,  # T of the rectified pseudo-label
        "num_negatives": 400,  # K
        "sampling": "topk",  # "topk" (official) | "random"
        "confidence_threshold": 0.0,  # for sampling = "random"
        "backend": "auto",  # rcps_kernels backend: "auto" | "cpu" | "triton" | "cuda" | "reference"
        "cross_rank_negatives": False,  # DDP: pool negatives from all ranks (all-gather keeping gradients)
        "class_weights": [1.0, 10.0],  # CE class weights of L_seg
        "ce_lambda": 2.0 / 11.0,  # CE weight in Dice + CE: (1 + len(fg weights)) / (1 + sum(fg weights))
    },
    "eval": {
        "every_epochs": 5,  # validation Dice on the data.val_cases split (none without one); 0: off
        "overlap": 0.875,
        "sw_batch_size": 4,
        "sigma_scale": 0.125,
        "max_cases": 0,  # 0: all validation cases (the validation split; the final test evaluation uses all)
    },
}

CHOICES = {
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("data", "format"): ("nifti", "h5", "nnunet"),
    ("train", "method"): ("rcps", "supervised"),
    ("train", "amp"): ("auto", "off", "fp16", "bf16"),
    ("loss", "sampling"): ("topk", "random"),
    ("loss", "backend"): ("auto", "cpu", "triton", "cuda", "reference"),
}


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names it."""


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list) and all(_type_ok(default[0], v) for v in value)
    return isinstance(value, type(default))


def _merge(base: dict, update: dict, source: str) -> None:
    for section, values in update.items():
        if section not in base:
            hint = difflib.get_close_matches(section, base, n=1)
            suggestion = f" (did you mean [{hint[0]}]?)" if hint else ""
            raise ConfigError(f"{source}: unknown section [{section}]{suggestion}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in values.items():
            _set(base, f"{section}.{key}", value, source)


def _set(config: dict, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in config or key not in config[section]:
        known = [f"{s}.{k}" for s in config for k in config[s]]
        hint = difflib.get_close_matches(dotted, known, n=1)
        raise ConfigError(f"{source}: unknown key '{dotted}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    default = DEFAULTS[section][key]
    # data.labeled and data.val_cases are an int (a count) or a str (a file of IDs).
    if dotted in ("data.labeled", "data.val_cases"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    else:
        ok = _type_ok(default, value)
    if not ok:
        raise ConfigError(f"{source}: '{dotted}' = {value!r} has the wrong type (expected like {default!r})")
    if (section, key) in CHOICES and value not in CHOICES[(section, key)]:
        raise ConfigError(f"{source}: '{dotted}' = {value!r} is not one of {CHOICES[(section, key)]}")
    config[section][key] = float(value) if isinstance(default, float) else value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as TOML (``3``, ``0.1``, ``[96, 96, 96]``, ``true``), else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """Build a run configuration.

    Args:
        path: a TOML file, or the name of a shipped config (``demo``, ``la``, ``pancreas``, ``synthetic``).
        overrides: ``key=value`` strings applied last, e.g. ``train.epochs=3``.
        base: start from this resolved config instead of the defaults (e.g. one stored in a checkpoint).

    Returns:
        The nested dict, every key present, validated.
    """
    config = copy.deepcopy(base if base is not None else DEFAULTS)
    if path is not None:
        text, source = read_config_text(path)
        try:
            _merge(config, tomllib.loads(text), source)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML: {err}") from None
    for item in overrides:
        key, value = parse_override(item)
        _set(config, key, value, f"--set {item}")
    validate(config)
    return config


def read_config_text(path: str | Path) -> tuple[str, str]:
    """Text of a config file, or of a shipped one when ``path`` is a bare name like ``demo``."""
    path = Path(path)
    if path.exists():
        return path.read_text(), str(path)
    shipped = importlib.resources.files("rcps_train") / "configs" / f"{path.stem}.toml"
    if path.suffix in ("", ".toml") and path.parent == Path(".") and shipped.is_file():
        return shipped.read_text(), f"rcps_train/configs/{path.stem}.toml"
    raise ConfigError(f"config file {str(path)!r} does not exist (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.name[:-5] for p in (importlib.resources.files("rcps_train") / "configs").iterdir()
                  if p.name.endswith(".toml"))


def validate(config: dict) -> None:
    """Cross-field checks that single-key type checks cannot do."""
    data, train, loss = config["data"], config["train"], config["loss"]
    if len(data["patch_size"]) != 3 or min(data["patch_size"]) < 1:
        raise ConfigError(f"data.patch_size must be 3 positive ints, got {data['patch_size']}")
    if data["num_classes"] < 2:
        raise ConfigError(f"data.num_classes must be >= 2, got {data['num_classes']}")
    if len(loss["class_weights"]) != data["num_classes"]:
        raise ConfigError(f"loss.class_weights has {len(loss['class_weights'])} entries, "
                          f"data.num_classes is {data['num_classes']}")
    if isinstance(data["labeled"], int) and data["labeled"] < 1:
        raise ConfigError(f"data.labeled must be >= 1 (a count) or a file of IDs, got {data['labeled']}")
    if isinstance(data["val_cases"], int) and data["val_cases"] < 0:
        raise ConfigError(f"data.val_cases must be >= 0 (a count) or a file of IDs, got {data['val_cases']}")
    if train["epochs"] < 1 or train["batch_size"] < 1:
        raise ConfigError("train.epochs and train.batch_size must be >= 1")
    if not 0.0 <= config["eval"]["overlap"] < 1.0:
        raise ConfigError(f"eval.overlap must be in [0, 1), got {config['eval']['overlap']}")
    if loss["num_negatives"] < 1 or loss["tau"] <= 0 or loss["sharpen_temperature"] <= 0:
        raise ConfigError("loss.num_negatives must be >= 1 and loss.tau, loss.sharpen_temperature > 0")


def to_toml(config: dict) -> str:
    """Serialise a resolved config (flat tables of scalars and lists) as TOML."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)
