"""Every knob of a run, declared once: its default, the rule its value must satisfy, a one-line help and whether a
``--resume`` may change it. :mod:`rcps_train.config` derives its defaults, checks, resume rule and the generated
reference ``docs/config.md`` from :data:`KNOBS`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from rcps_kernels import backends

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


def count_or_file(low: int) -> Rule:
    """An int count of at least ``low``, or a non-empty string (the path of a file of IDs, or a keyword)."""
    return Rule(
        lambda v: v.strip() != "" if isinstance(v, str) else low <= v <= INT_LIMIT,
        f"a count >= {low} or the path of a file of IDs",
    )


NAME = Rule(lambda v: v.strip() not in ("", ".", ".."), "a non-empty folder name")
ANY_TEXT = Rule(lambda v: True, "a string")
ANY_BOOL = Rule(lambda v: True, "true or false")
# 1e-6..1e3: the temperatures the kernels are meant to be exact over against float64; far below, the fused
# InfoNCE gradients lose their digits (NaN by 1e-10).
TEMPERATURE = number(1e-6, 1e3)
# Loss weights: far above any useful value (the paper uses 0.1-10), so a typo like 1e10 is caught before the
# weighted sum overflows float32.
LOSS_WEIGHT = number(0.0, 1000.0)


class Knob(NamedTuple):
    """One ``section.key`` of a run config.

    Attributes:
        default: the value a config without the key gets; its type is the key's type (ints are accepted where
            it is a float).
        rule: what the value must satisfy beyond its type.
        help: one line for the config reference.
        resume_safe: a ``--resume`` may change it without making the resumed run a different run.
        types: the types a value may have when they are not just the default's (bool never counts as int).
    """

    default: Any
    rule: Rule
    help: str
    resume_safe: bool = False
    types: tuple[type, ...] | None = None


# Resume safety: where the run folder lies (the checkpoint was found there), how data is loaded (items are keyed
# by seeds, so workers and caching cannot change them), progress bars, when checkpoints are written and when to
# stop (checkpoints only read the random states), how many windows one evaluation forward takes, and whether
# TensorBoard logs. Everything else (run.device included: it changes the numerics and what amp = "auto" means)
# would make the resumed run a different run.
KNOBS: dict[str, Knob] = {
    "run.name": Knob("rcps", NAME, "the run folder is <out_dir>/<name>", resume_safe=True),
    "run.out_dir": Knob("runs", ANY_TEXT, 'the folder of run folders ("": the current folder)', resume_safe=True),
    # numpy seeds must be non-negative and below 2**32 (seed + rank)
    "run.seed": Knob(42, integer(0), "seed of every random stream (each rank adds its rank)"),
    "run.device": Knob("auto", one_of("auto", "cpu", "cuda"), '"auto" (CUDA when there is one) | "cpu" | "cuda"'),
    "data.format": Knob(
        "nifti",
        one_of("nifti", "h5", "nnunet"),
        '"nifti": <root>/{train,val}_{images,labels}/<name>.nii.gz; "h5": UA-MT/MC-Net layout; '
        '"nnunet": nnU-Net v2 raw (dataset.json, imagesTr/labelsTr, imagesTs/labelsTs)',
    ),
    # checked by the data layer, which names the missing folder
    "data.root": Knob("", ANY_TEXT, "the dataset folder"),
    "data.labeled": Knob(
        8,
        Rule(count_or_file(1).holds, 'a count >= 1, "all" or the path of a file of IDs'),
        "int: the first N of the sorted training list (the others' labels are hidden); str: a file of IDs, one a "
        'line; "all": every training case (unlabeled images then come from unlabeled_dir alone)',
        types=(int, str),
    ),
    # checked by the data layer, which names the missing or empty folder
    "data.unlabeled_dir": Knob(
        "", ANY_TEXT, 'a folder of unlabeled images (no labels), under root or absolute; "": none'
    ),
    "data.val_cases": Knob(
        0,
        count_or_file(0),
        "validation split for eval.every_epochs and best.pt (its labels only score), from the hidden-label "
        'training cases, or from the labeled ones when labeled = "all": int: the last N (0: none); str: an ID file',
        types=(int, str),
    ),
    "data.num_classes": Knob(2, integer(2, 1024), "segmentation classes, background included"),
    # Any size runs (every decoder stage is resized to its skip); 1024 bounds a typo's memory.
    "data.patch_size": Knob([112, 112, 80], each(integer(1, 1024), length=3), "training patch, voxels per axis"),
    "data.num_workers": Knob(2, integer(0, 256), "data loader worker processes", resume_safe=True),
    "data.cache": Knob(
        True,
        ANY_BOOL,
        "keep every (normalised) volume in memory after the start-up check",
        resume_safe=True,
    ),
    "data.grid_distortion_prob": Knob(0.1, number(0.0, 1.0), "probability of a random grid distortion per patch"),
    # cell widths scale by 1 +- limit > 0
    "data.grid_distortion_limit": Knob(
        0.1, number(0.0, 1.0, high_open=True), "each distortion cell's width scales by 1 +- up to this"
    ),
    "data.grid_distortion_cells": Knob(5, integer(1, 1024), "grid distortion cells per axis"),
    # five encoder levels (strides 1, 2, 2, 2, 2)
    "model.widths": Knob(
        [16, 32, 64, 128, 256], each(integer(1, 4096), length=5), "channels of the five encoder levels"
    ),
    "model.project_dim": Knob(64, integer(1, 4096), "channels of the projection head's output"),
    "model.checkpointing": Knob(
        False, ANY_BOOL, "recompute the U-Net blocks in backward (saves most activation memory)"
    ),
    "model.channels_last": Knob(False, ANY_BOOL, "channels_last_3d layout (lower CPU peak memory at large patches)"),
    "train.method": Knob(
        "rcps",
        one_of("rcps", "supervised"),
        '"rcps" | "supervised" (L_seg on the labeled cases only, everything else equal)',
    ),
    "train.epochs": Knob(100, integer(1, 10**6), "one epoch = one pass over the unlabeled cases"),
    "train.rampup_epochs": Knob(
        0, integer(0, 10**6), "epochs over which the unsupervised weights ramp up to 1; 0: the whole run (the paper)"
    ),
    "train.max_steps_per_epoch": Knob(0, integer(0), "0: the whole pass; >0 caps it (short demos and tests)"),
    "train.batch_size": Knob(1, integer(1, 4096), "labeled and unlabeled patches per step and device"),
    # the paper uses 0.01; SGD beyond 10 only diverges
    "train.lr": Knob(0.01, number(0.0, 10.0, low_open=True), "SGD learning rate after the warm-up (poly decay)"),
    "train.warmup_epochs": Knob(5, integer(0), "epochs of linear warm-up from warmup_lr to lr"),
    "train.warmup_lr": Knob(1e-4, number(0.0, 10.0), "learning rate at the start of the warm-up"),
    "train.poly_power": Knob(0.9, number(0.0), "exponent of the poly decay"),
    # momentum >= 1 never forgets a step
    "train.momentum": Knob(0.9, number(0.0, 1.0, high_open=True), "SGD momentum"),
    "train.weight_decay": Knob(1e-4, number(0.0, 1.0), "SGD weight decay"),
    "train.amp": Knob(
        "auto",
        one_of("auto", "off", "fp16", "bf16"),
        '"auto" (fp16 + GradScaler on CUDA, off on CPU) | "off" | "fp16" | "bf16"',
    ),
    "train.checkpoint_every": Knob(
        100, integer(1), "steps between checkpoints (also written at every epoch end)", resume_safe=True
    ),
    "train.stop_after_steps": Knob(
        0, integer(0), ">0: checkpoint and stop after this global step (time-limited jobs, tests)", resume_safe=True
    ),
    "train.progress": Knob(True, ANY_BOOL, "tqdm progress bars", resume_safe=True),
    "loss.alpha": Knob(0.1, LOSS_WEIGHT, "weight of L_urp + L_cr (0.2 for Pancreas)"),
    "loss.beta": Knob(0.1, LOSS_WEIGHT, "weight of L_bc"),
    "loss.tau": Knob(0.1, TEMPERATURE, "InfoNCE temperature"),
    "loss.sharpen_temperature": Knob(0.5, TEMPERATURE, "T of the rectified pseudo-label"),
    # the bank is capped by the voxels there are; 400 in the paper
    "loss.num_negatives": Knob(400, integer(1, 65536), "K, negatives per anchor"),
    "loss.sampling": Knob("topk", one_of("topk", "random"), '"topk" (official) | "random"'),
    # a softmax probability
    "loss.confidence_threshold": Knob(0.0, number(0.0, 1.0), 'for sampling = "random"'),
    "loss.backend": Knob("auto", one_of(*backends.NAMES), "rcps_kernels backend: " + " | ".join(backends.NAMES)),
    "loss.cross_rank_negatives": Knob(
        False, ANY_BOOL, "DDP: pool negatives from all ranks (all-gather keeping gradients)"
    ),
    # Not 0 (nor below float32's range): the weighted CE is 0/0 on a patch of such a class alone.
    "loss.class_weights": Knob([1.0, 10.0], each(number(1e-6, 1000.0)), "CE class weights of L_seg"),
    "loss.ce_lambda": Knob(
        2.0 / 11.0,
        LOSS_WEIGHT,
        "CE weight in Dice + CE: (1 + len(fg weights)) / (1 + sum(fg weights))",
    ),
    "eval.every_epochs": Knob(5, integer(0), "validation Dice on the data.val_cases split (none without one); 0: off"),
    "eval.protocol": Knob(
        "rcps",
        one_of(*EVAL_PROTOCOLS),
        "window, stride, blending: "
        + " | ".join(f'"{name}"' for name in EVAL_PROTOCOLS)
        + " (docs/trainer.md: Evaluation)",
    ),
    "eval.largest_component": Knob(
        "auto",
        one_of(*LARGEST_COMPONENT_CHOICES),
        '"auto" (the protocol\'s choice) | "on" | "off": keep the largest component',
    ),
    "eval.overlap": Knob(0.875, number(0.0, 1.0, high_open=True), "overlap of the rcps protocol's windows"),
    "eval.sw_batch_size": Knob(
        4, integer(1, 4096), "windows per forward in sliding-window inference", resume_safe=True
    ),
    "eval.sigma_scale": Knob(
        0.125, number(0.0, 1000.0, low_open=True), "sigma of the Gaussian blending, as a fraction of the window"
    ),
    "eval.max_cases": Knob(
        0, integer(0), "0: all validation cases (the validation split; the final test evaluation uses all)"
    ),
    "log.tensorboard": Knob(
        False, ANY_BOOL, "also write <run>/tensorboard/ (needs the tensorboard extra)", resume_safe=True
    ),
}
