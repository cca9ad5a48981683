"""Run configuration: nested defaults, TOML files (stdlib ``tomllib``), ``--set key=value`` overrides, checks.

Every knob of a run lives in :data:`DEFAULTS`; a TOML file overrides any subset of it. Unknown keys and values
of the wrong type are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import math

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path
from typing import Any, Callable, NamedTuple

from rcps_kernels import backends

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
        # int: the first N of the sorted training list (the others' labels are hidden); str: a file of IDs, one a
        # line; "all": every training case (unlabeled images then come from unlabeled_dir alone)
        "labeled": 8,
        "unlabeled_dir": "",  # a folder of unlabeled images (no labels), under root or absolute; "": none
        # Validation split for eval.every_epochs and best.pt (its labels only score): taken from the hidden-label
        # training cases, or from the labeled ones when labeled = "all": int: the last N (0: none); str: an ID file
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
        "epochs": 100,  # one epoch = one pass over the unlabeled cases
        "rampup_epochs": 0,  # epochs over which the unsupervised weights ramp up to 1; 0: the whole run (the paper)
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
        "backend": "auto",  # rcps_kernels backend: "auto" | "cpu" | "triton" | "cuda" | "torch" | "reference"
        "cross_rank_negatives": False,  # DDP: pool negatives from all ranks (all-gather keeping gradients)
        "class_weights": [1.0, 10.0],  # CE class weights of L_seg
        "ce_lambda": 2.0 / 11.0,  # CE weight in Dice + CE: (1 + len(fg weights)) / (1 + sum(fg weights))
    },
    "eval": {
        "every_epochs": 5,  # validation Dice on the data.val_cases split (none without one); 0: off
        "protocol": "rcps",  # "rcps" | "ssl-la" | "ssl-pancreas": window, stride, blending (README: Evaluation)
        "largest_component": "auto",  # "auto" (the protocol's choice) | "on" | "off": keep the largest component
        "overlap": 0.875,
        "sw_batch_size": 4,
        "sigma_scale": 0.125,
        "max_cases": 0,  # 0: all validation cases (the validation split; the final test evaluation uses all)
    },
    "log": {
        "tensorboard": False,  # also write <run>/tensorboard/ (needs the tensorboard extra)
    },
}

#: Evaluation presets (rcps_train/evaluate.py) and the largest-component switch; the CLI offers the same choices.
EVAL_PROTOCOLS = ("rcps", "ssl-la", "ssl-pancreas")
LARGEST_COMPONENT_CHOICES = ("auto", "on", "off")

INT_LIMIT = 2**31 - 1  # counts go to numpy/torch/C++ as 32-bit ints; nothing here needs more


class Rule(NamedTuple):
    """The check of one key's (already type-checked) value and what it expects, as in "must be <expected>"."""

    holds: Callable[[Any], bool]
    expected: str


def _finite_number(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def integer(low: int, high: int = INT_LIMIT) -> Rule:
    """An int in ``[low, high]``."""
    return Rule(lambda v: low <= v <= high, f"an integer in [{low}, {high}]")


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number in an interval; ``inf`` bounds leave that side open."""

    def holds(v):
        return _finite_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    if high == math.inf:
        return Rule(holds, f"a finite number {'>' if low_open else '>='} {low}")
    return Rule(holds, f"a finite number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*choices: str) -> Rule:
    """One of the listed strings."""
    return Rule(lambda v: v in choices, f"one of {choices}")


def each(rule: Rule, length: int | None = None) -> Rule:
    """A list whose entries all satisfy ``rule`` (and of ``length`` entries, when given)."""

    def holds(v):
        return (length is None or len(v) == length) and len(v) > 0 and all(rule.holds(x) for x in v)

    count = f"{length}" if length is not None else "1 or more"
    return Rule(holds, f"a list of {count} entries, each {rule.expected}")


NAME = Rule(lambda v: v.strip() not in ("", ".", ".."), "a non-empty folder name")
ANY_TEXT = Rule(lambda v: True, "a string")
ANY_BOOL = Rule(lambda v: True, "true or false")
# 1e-6..1e3: the temperatures the kernels are meant to be exact over against float64; far below, the fused
# InfoNCE gradients lose their digits (NaN by 1e-10).
TEMPERATURE = number(1e-6, 1e3)
# Loss weights: far above any useful value (the paper uses 0.1-10), so a typo like 1e10 is caught before the
# weighted sum overflows float32.
LOSS_WEIGHT = number(0.0, 1000.0)

# One rule per key of DEFAULTS (a test checks that none is missing); cross-key checks are in validate().
RULES: dict[str, Rule] = {
    "run.name": NAME,
    "run.out_dir": ANY_TEXT,  # "" is the current folder
    "run.seed": integer(0),  # numpy seeds must be non-negative and below 2**32 (seed + rank)
    "run.device": one_of("auto", "cpu", "cuda"),
    "data.format": one_of("nifti", "h5", "nnunet"),
    "data.root": ANY_TEXT,  # checked by the data layer, which names the missing folder
    "data.labeled": Rule(
        lambda v: v.strip() != "" if isinstance(v, str) else 1 <= v <= INT_LIMIT,
        'a count >= 1, "all" or the path of a file of IDs',
    ),
    "data.unlabeled_dir": ANY_TEXT,  # checked by the data layer, which names the missing or empty folder
    "data.val_cases": Rule(
        lambda v: v.strip() != "" if isinstance(v, str) else 0 <= v <= INT_LIMIT,
        "a count >= 0 or the path of a file of IDs",
    ),
    "data.num_classes": integer(2, 1024),
    # Any size runs (every decoder stage is resized to its skip); 1024 bounds a typo's memory.
    "data.patch_size": each(integer(1, 1024), length=3),
    "data.num_workers": integer(0, 256),
    "data.cache": ANY_BOOL,
    "data.grid_distortion_prob": number(0.0, 1.0),
    "data.grid_distortion_limit": number(0.0, 1.0, high_open=True),  # cell widths scale by 1 +- limit > 0
    "data.grid_distortion_cells": integer(1, 1024),
    "model.widths": each(integer(1, 4096), length=5),  # five encoder levels (strides 1, 2, 2, 2, 2)
    "model.project_dim": integer(1, 4096),
    "model.checkpointing": ANY_BOOL,
    "model.channels_last": ANY_BOOL,
    "train.method": one_of("rcps", "supervised"),
    "train.epochs": integer(1, 10**6),
    "train.rampup_epochs": integer(0, 10**6),
    "train.max_steps_per_epoch": integer(0),
    "train.batch_size": integer(1, 4096),
    "train.lr": number(0.0, 10.0, low_open=True),  # the paper uses 0.01; SGD beyond 10 only diverges
    "train.warmup_epochs": integer(0),
    "train.warmup_lr": number(0.0, 10.0),
    "train.poly_power": number(0.0),
    "train.momentum": number(0.0, 1.0, high_open=True),  # momentum >= 1 never forgets a step
    "train.weight_decay": number(0.0, 1.0),
    "train.amp": one_of("auto", "off", "fp16", "bf16"),
    "train.checkpoint_every": integer(1),
    "train.stop_after_steps": integer(0),
    "train.progress": ANY_BOOL,
    "loss.alpha": LOSS_WEIGHT,
    "loss.beta": LOSS_WEIGHT,
    "loss.tau": TEMPERATURE,
    "loss.sharpen_temperature": TEMPERATURE,
    "loss.num_negatives": integer(1, 65536),  # the bank is capped by the voxels there are; 400 in the paper
    "loss.sampling": one_of("topk", "random"),
    "loss.confidence_threshold": number(0.0, 1.0),  # a softmax probability
    "loss.backend": one_of(*backends.NAMES),
    "loss.cross_rank_negatives": ANY_BOOL,
    # Not 0 (nor below float32's range): the weighted CE is 0/0 on a patch of such a class alone.
    "loss.class_weights": each(number(1e-6, 1000.0)),
    "loss.ce_lambda": LOSS_WEIGHT,
    "eval.every_epochs": integer(0),
    "eval.overlap": number(0.0, 1.0, high_open=True),
    "eval.sw_batch_size": integer(1, 4096),
    "eval.sigma_scale": number(0.0, 1000.0, low_open=True),
    "eval.max_cases": integer(0),
    "eval.protocol": one_of(*EVAL_PROTOCOLS),
    "eval.largest_component": one_of(*LARGEST_COMPONENT_CHOICES),  # "auto": the protocol's own choice
    "log.tensorboard": ANY_BOOL,
}


# Keys a --resume may change: where the run folder lies (the checkpoint was found there), how data is loaded
# (items are keyed by seeds, so workers and caching cannot change them), progress bars, when checkpoints are
# written and when to stop (checkpoints only read the random states), and how many windows one evaluation
# forward takes. Everything else (run.device included: it changes the numerics and what amp = "auto" means)
# would make the resumed run a different run. Logging to TensorBoard or not changes nothing of the run.
RESUME_SAFE_KEYS = frozenset(
    {
        "run.name",
        "run.out_dir",
        "data.num_workers",
        "data.cache",
        "train.progress",
        "train.checkpoint_every",
        "train.stop_after_steps",
        "eval.sw_batch_size",
        "log.tensorboard",
    }
)


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
    problem = _value_problem(dotted, value)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    config[section][key] = _as_default_type(DEFAULTS[section][key], value)


def _as_default_type(default: Any, value: Any) -> Any:
    """Ints where the default is a float (or a list of floats) become floats: ``lr = 1``, ``[1, 10]``."""
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list) and isinstance(default[0], float):
        return [float(v) for v in value]
    return value


def _value_problem(dotted: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the known key ``dotted`` (its type, then its rule), or None."""
    section, _, key = dotted.partition(".")
    default = DEFAULTS[section][key]
    # data.labeled and data.val_cases are an int (a count) or a str (a file of IDs).
    if dotted in ("data.labeled", "data.val_cases"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    else:
        ok = _type_ok(default, value)
    if not ok:
        return f"'{dotted}' = {value!r} has the wrong type (expected like {default!r})"
    if not RULES[dotted].holds(value):
        return f"'{dotted}' = {value!r} is not {RULES[dotted].expected}"
    return None


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


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    base: dict | None = None,
    base_source: str = "base config",
) -> dict:
    """Build a run configuration.

    Args:
        path: a TOML file, or the name of a shipped config (``demo``, ``la``, ``pancreas``, ``synthetic``).
        overrides: ``key=value`` strings applied last, e.g. ``train.epochs=3``.
        base: a config (e.g. one stored in a checkpoint) applied over the defaults before the file; its keys are
            checked like a file's, and keys it lacks keep their defaults.
        base_source: how error messages name ``base``.

    Returns:
        The nested dict, every key present, validated.
    """
    config = copy.deepcopy(DEFAULTS)
    if base is not None:
        if not isinstance(base, dict):
            raise ConfigError(f"{base_source}: expected a table of sections, got {type(base).__name__}")
        _merge(config, base, base_source)
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
    return sorted(
        p.name[:-5] for p in (importlib.resources.files("rcps_train") / "configs").iterdir() if p.name.endswith(".toml")
    )


def validate(config: dict) -> None:
    """Check every key against :data:`RULES`, then what single keys cannot say on their own.

    Raises:
        ConfigError: naming the first bad key and what it expects.
    """
    expected = {f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s]}
    present = {f"{s}.{k}" for s, values in config.items() for k in values}
    if present != expected:
        raise ConfigError(f"config keys missing: {sorted(expected - present)}, unknown: {sorted(present - expected)}")
    for dotted in sorted(expected):
        section, _, key = dotted.partition(".")
        problem = _value_problem(dotted, config[section][key])
        if problem:
            raise ConfigError(problem)
    data, train, loss = config["data"], config["train"], config["loss"]
    if len(loss["class_weights"]) != data["num_classes"]:
        raise ConfigError(
            f"loss.class_weights has {len(loss['class_weights'])} entries, data.num_classes is {data['num_classes']}"
        )
    # BatchNorm in training needs more than one value per channel at the deepest level (1/16 of the patch);
    # an RCPS step stacks 6 volumes per patch, a supervised step only the labeled one.
    volumes = train["batch_size"] * (6 if train["method"] == "rcps" else 1)
    if volumes * math.prod(-(-n // 16) for n in data["patch_size"]) < 2:
        raise ConfigError(
            f"data.patch_size = {data['patch_size']} leaves one voxel per channel at the deepest level "
            f"with train.method = {train['method']!r} and train.batch_size = {train['batch_size']} "
            f"({volumes} volumes a step), too few for BatchNorm; use a patch larger than 16 on some "
            f"axis or a larger batch"
        )


def resume_changes(stored: dict, requested: dict, source: str) -> list[str]:
    """Compare the config a checkpoint was written with to the one a ``--resume`` asks for.

    Args:
        stored: the checkpoint's config (keys it lacks take their defaults).
        requested: the resolved config of the resumed run.
        source: the checkpoint, for messages.

    Returns:
        ``"key: old -> new"`` for each changed key of :data:`RESUME_SAFE_KEYS`.

    Raises:
        ConfigError: listing every other changed key.
    """
    stored = load_config(None, base=stored, base_source=f"{source} (its stored config)")
    changes = {
        f"{s}.{k}": f"{s}.{k}: {stored[s][k]!r} -> {requested[s][k]!r}"
        for s in requested
        for k in requested[s]
        if stored[s][k] != requested[s][k]
    }
    unsafe = [text for key, text in changes.items() if key not in RESUME_SAFE_KEYS]
    if unsafe:
        raise ConfigError(
            f"--resume: the config differs from the one {source} was written with ("
            + "; ".join(unsafe)
            + "). Resume with the run folder's config.toml, or start a new run.name"
        )
    return list(changes.values())


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
