"""The training loop: set-up, epochs, logged steps (each one :func:`rcps_train.step.train_step`), validation,
checkpoints, test scoring.

A run folder ``<run.out_dir>/<run.name>`` holds ``config.toml`` (resolved), ``train_log.csv`` (one row per
step), ``val_log.csv`` (validation-split Dice per scored epoch), ``checkpoint.pt`` (the last state), ``best.pt``
(the weights of the best validation Dice, with a validation split), PNG plots, ``tensorboard/`` (with
``log.tensorboard``) and, at the end, the test split's ``metrics.csv`` / ``metrics.json`` (and
``metrics_best.csv``). The test split is read once before the first step to check its files, and predicted only
after the last step, for both checkpoints: it never chooses anything.
Checkpoints (their format), RNG streams and the CSV logs are written and read back by :mod:`rcps_train.checkpoint`;
the network is built by :mod:`rcps_train.model`. The run's helpers all take the :class:`~rcps_train.run.TrainingRun`.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rcps_kernels import backends

from . import distributed as ddp
from .checkpoint import (
    append_row,
    check_fresh_run_folder,
    check_output_folder,
    checkpoint_to_resume,
    load_best,
    restore_checkpoint,
    save_best,
    save_checkpoint,
    start_clean,
    truncate_log,
)
from .config import ConfigError, run_settings, to_toml, validate
from .data import (
    PairedPatchDataset,
    Splits,
    VolumeStore,
    case_spacing,
    check_cases,
    data_record,
    dataset_splits,
    epoch_plan,
    seed_worker,
)
from .deprecation import deprecated_names
from .evaluate import distance_unit, evaluate_cases, format_table, metrics_record, write_metrics_csv
from .files import write_text_atomic
from .losses import TERMS, learning_rate, ramp_weight
from .model import build_parallel_model
from .plots import plot_run
from .prepare import PREPROCESSING_FILE, read_preprocessing
from .run import TrainingRun
from .step import StepContext, train_step
from .tensorboard_log import TensorBoardLog, require_tensorboard

VAL_FIELDS = [
    "epoch",
    "dice",
    "jaccard",
    "hd95",
    "asd",
    "num_undefined_distances",
    "distance_unit",
    "protocol",
    "largest_component",
]
LOG_FIELDS = ["epoch", "step", "global_step", "lr", "ramp", "loss", *TERMS, "step_time_s", "peak_mem_mb"]


def resolve_device(config: dict, local_rank: int = 0) -> torch.device:
    """The device of ``run.device`` (``auto``: this rank's GPU when there is one); ConfigError when CUDA is asked
    for but missing."""
    wanted = config["run"]["device"]
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is available")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_settings(config: dict, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use GradScaler)``: fp16 + scaler on CUDA by default, fp32 on CPU."""
    amp = config["train"]["amp"]
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp = 'fp16' needs CUDA; use 'bf16' or 'off' on CPU")
    if amp == "bf16" and device.type == "cpu" and config["data"]["patch_size"][-1] <= 8:
        # The encoder's fifth level halves a last axis of 1 voxel here, and torch's oneDNN bf16 backward of a
        # stride-2 Conv3d on an input whose last axis is 1 returns non-finite weight gradients in about one call in
        # three (torch 2.14, reproduced outside this package): the run would stop with a NaN loss a step later.
        raise ConfigError(
            f"train.amp = 'bf16' on CPU needs data.patch_size[-1] > 8 (got {config['data']['patch_size']}): "
            "torch's oneDNN bf16 convolution backward gives non-finite gradients when a stride-2 level halves "
            "a last axis of 1 voxel; use a larger patch or train.amp = 'off'"
        )
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return dtype, amp == "fp16"


def check_loss_backend(config: dict, device: torch.device) -> None:
    """Raise ConfigError when ``loss.backend`` cannot run on ``device`` (instead of failing at the first step)."""
    backend = config["loss"]["backend"]
    try:
        backends.resolve(backend, device)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"loss.backend = {backend!r} cannot run on {device}: {err}") from None


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(config: dict, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Run (or resume) a training run, then score the test split with the last (and the best) weights.

    Args:
        config: a resolved config (see :mod:`rcps_train.config`).
        resume: continue from ``<run folder>/checkpoint.pt``.
        overwrite: a fresh run may replace the results and weights of an earlier run in its folder (once every
            input has been checked); without it such a folder is refused.

    Returns:
        The test metrics of the last weights, with those of ``best.pt`` under ``"best"`` when there is a
        validation split, on the main process (None on other ranks, or when stopped early).
    """
    validate(config)  # again: callers may have edited the dict (paths, names) since load_config
    device = resolve_device(config, ddp.local_rank())
    rank, world_size, created_group = ddp.init_distributed(device)
    run = None
    try:
        run = set_up_run(config, resume, device, rank, world_size, overwrite)
        stopped = False
        while run.epoch < config["train"]["epochs"] and not stopped:
            stopped = run_epoch(run)
        result = None
        if run.main and not stopped:  # an early stop leaves the test split unread
            result = _score_test_split(run)
        ddp.barrier()
        return result
    finally:
        if run is not None and run.tensorboard is not None:
            run.tensorboard.close()
        if created_group:
            ddp.cleanup()


def set_up_run(
    config: dict, resume: bool, device: torch.device, rank: int, world_size: int, overwrite: bool = False
) -> TrainingRun:
    """Check the config against the device and the run folder, seed every stream, read the data, build the
    model and optimizer, and continue from the checkpoint on ``resume`` (or clear the folder of a fresh run).

    The order is part of the run's reproducibility: the seeds are set before the model is built (the same
    initial weights on every rank), and a resumed run then overwrites every stream with the saved ones.
    """
    settings = run_settings(config)
    amp_dtype, use_scaler = amp_settings(config, device)
    check_loss_backend(config, device)
    if settings.log.tensorboard:
        require_tensorboard()
    main = rank == 0
    run_dir = Path(settings.run.out_dir) / settings.run.name
    state = checkpoint_to_resume(config, run_dir / "checkpoint.pt", resume, main, device)
    if main and resume:
        check_output_folder(run_dir, "run folder")
    elif main:
        check_fresh_run_folder(run_dir, overwrite)
    generators = _seed(settings.run.seed, rank)
    splits, dataset = _read_data(config, main)
    model, raw_model = build_parallel_model(config, splits.channels, device, world_size)
    train_cfg = settings.train
    optimizer = torch.optim.SGD(
        model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay
    )
    step = StepContext(
        model,
        optimizer,
        torch.amp.GradScaler(device.type, enabled=use_scaler),
        config,
        device,
        amp_dtype,
        generators["augment"],
        generators["negatives"],
        ddp.gather_negative_pool if settings.loss.cross_rank_negatives and world_size > 1 else None,
    )
    run = TrainingRun(config, device, rank, world_size, run_dir, splits, dataset, raw_model, step)
    run.preprocessing = read_preprocessing(settings.data.root)
    run.data = data_record(splits)
    if resume:
        restore_checkpoint(run, state)
    if main:
        if not resume:  # only now, after every input was checked: a bad input leaves the folder as it was
            start_clean(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.toml", to_toml(config))
        if run.preprocessing is not None:  # predict applies the same preparation to new scans
            write_text_atomic(run_dir / PREPROCESSING_FILE, json.dumps(run.preprocessing, indent=2))
        if resume:
            truncate_log(run_dir / "train_log.csv", "global_step", run.global_step)
            truncate_log(run_dir / "val_log.csv", "epoch", run.epoch)
        if settings.log.tensorboard:
            run.tensorboard = TensorBoardLog(run_dir, purge_step=run.global_step + 1 if resume else None)
    return run


def _seed(seed: int, rank: int) -> dict[str, torch.Generator]:
    """Seed the global streams and return the run's own generators (``augment``, ``negatives``)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # the same initial weights on every rank
    return {
        "augment": torch.Generator().manual_seed(seed * 1009 + rank),
        "negatives": torch.Generator().manual_seed(seed * 2003 + rank),
    }


def _read_data(config: dict, main: bool) -> tuple[Splits, PairedPatchDataset]:
    """The splits and the training dataset; the validation and test files are checked now, before step 1."""
    splits = dataset_splits(config["data"])
    data_cfg = run_settings(config).data
    classes, channels = data_cfg.num_classes, splits.channels
    dataset = PairedPatchDataset(
        VolumeStore(splits.labeled, classes, channels, data_cfg.cache),
        VolumeStore(splits.unlabeled, classes, channels, data_cfg.cache),
        data_cfg.patch_size,
        data_cfg.grid_distortion_prob,
        data_cfg.grid_distortion_limit,
        data_cfg.grid_distortion_cells,
    )
    check_cases(splits.validation + splits.test, classes, channels)  # before step 1, not after the last
    for scored in (splits.validation, splits.test):  # mm or voxels, never both in one table
        distance_unit(scored, [case_spacing(case) for case in scored])
    if main and config["eval"]["every_epochs"] and not splits.validation:
        print(
            "rcps-train: no validation split (data.val_cases = 0): no validation during training and no best.pt; "
            "the test split is scored once, after the last epoch"
        )
    return splits, dataset


def run_epoch(run: TrainingRun) -> bool:
    """Train from ``run``'s position to the end of its epoch (validating and checkpointing as configured).

    Returns:
        True when ``train.stop_after_steps`` stopped the run inside the epoch.
    """
    settings = run_settings(run.config)
    train_cfg = settings.train
    epochs, batch_size = train_cfg.epochs, train_cfg.batch_size
    lr = learning_rate(
        run.epoch, epochs, train_cfg.lr, train_cfg.warmup_epochs, train_cfg.warmup_lr, train_cfg.poly_power
    )
    for group in run.step.optimizer.param_groups:
        group["lr"] = lr
    ramp = ramp_weight(run.epoch, train_cfg.rampup_epochs or epochs)
    plan = epoch_plan(
        len(run.splits.labeled),
        len(run.splits.unlabeled),
        run.epoch,
        settings.run.seed,
        run.rank,
        run.world_size,
        train_cfg.max_steps_per_epoch,
        batch_size,
    )
    steps = len(plan) // batch_size
    loader = DataLoader(
        run.dataset,
        batch_size=batch_size,
        sampler=plan[run.step_in_epoch * batch_size :],
        num_workers=settings.data.num_workers,
        worker_init_fn=seed_worker,
        pin_memory=run.device.type == "cuda",
    )
    bar = tqdm(
        loader,
        total=steps,
        initial=run.step_in_epoch,
        desc=f"epoch {run.epoch + 1}/{epochs}",
        disable=not (run.main and train_cfg.progress),
        leave=False,
    )
    with contextlib.closing(bar):
        for batch in bar:
            values = _logged_step(run, batch, lr, ramp)
            if run.main:
                bar.set_postfix(loss=f"{values['loss']:.3f}", seg=f"{values['seg']:.3f}")
            if _after_step(run, steps):
                return True
    return False


def _logged_step(run: TrainingRun, batch: dict, lr: float, ramp: float) -> dict[str, float]:
    """One :func:`train_step`, counted, timed and appended to ``train_log.csv``; returns its loss values."""
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    start = time.perf_counter()
    values = train_step(run.step, batch, ramp)
    run.step_in_epoch += 1
    run.global_step += 1
    row = {
        "epoch": run.epoch,
        "step": run.step_in_epoch,
        "global_step": run.global_step,
        "lr": lr,
        "ramp": ramp,
        **values,
        "step_time_s": time.perf_counter() - start,
        "peak_mem_mb": peak_memory_mb(run.device),
    }
    if run.main:
        append_row(run.run_dir / "train_log.csv", LOG_FIELDS, row)
        if run.tensorboard is not None:
            run.tensorboard.log_step(row, TERMS)
    return values


def _after_step(run: TrainingRun, steps: int) -> bool:
    """Advance to the next epoch after its last step (validating then), checkpoint when due; True to stop."""
    train_cfg = run_settings(run.config).train
    stop = bool(train_cfg.stop_after_steps) and run.global_step >= train_cfg.stop_after_steps
    if run.step_in_epoch == steps:
        run.epoch, run.step_in_epoch = run.epoch + 1, 0
    if stop or run.step_in_epoch == 0 or run.global_step % train_cfg.checkpoint_every == 0:
        if run.step_in_epoch == 0:
            _validate_during_training(run)
        save_checkpoint(run)
    return stop


def _validate_during_training(run: TrainingRun) -> None:
    """Score the validation split after an epoch when ``eval.every_epochs`` says so, and after the last one;
    keep the weights of the best mean Dice so far as ``best.pt`` (main process only)."""
    config, epochs_done = run.config, run.epoch
    settings = run_settings(config)
    every = settings.eval.every_epochs
    if not ddp.is_main_process() or not run.splits.validation or not every:
        return
    if epochs_done % every and epochs_done != settings.train.epochs:
        return
    cases = run.splits.validation[: settings.eval.max_cases or None]
    previews = []

    def keep_first_preview(case, image, label, prediction):
        if not previews:
            previews.append((case.name, image, label, prediction))

    _, summary = evaluate_cases(run.raw_model, cases, config, run.device, False, keep_first_preview)
    best_so_far = max((entry["dice"] for entry in run.val_history), default=-1.0)
    run.val_history.append({"epoch": epochs_done, **summary})
    if summary["dice"] > best_so_far:
        save_best(run, summary["dice"], [c.name for c in cases])
    append_row(run.run_dir / "val_log.csv", VAL_FIELDS, {"epoch": epochs_done, **summary})
    if run.tensorboard is not None:
        run.tensorboard.log_validation(summary, run.global_step, previews[0], settings.data.num_classes)
    plot_run(run.run_dir)


def _score_best(run: TrainingRun) -> dict | None:
    """Score the test split with ``best.pt`` (when the run has a validation split and wrote one) into
    ``metrics_best.csv``; returns its ``metrics.json`` record, or None."""
    loaded = load_best(run) if run.splits.validation else None
    if loaded is None:
        return None
    best_model, state = loaded
    rows, summary = evaluate_cases(best_model, run.splits.test, run.config, run.device, run.config["train"]["progress"])
    write_metrics_csv(rows, run.run_dir / "metrics_best.csv")
    print(f"test split, best.pt (epoch {state['epoch']}, validation Dice {state['val_dice']:.4f}):")
    print(format_table(rows, summary))
    return {
        "checkpoint": "best.pt",
        "epoch": state["epoch"],
        "val_dice": state["val_dice"],
        "val_cases": len(state["val_cases"]),
        **metrics_record(rows, summary),
    }


def _score_test_split(run: TrainingRun) -> dict:
    """Score the test split once with the last weights and, when there is one, with ``best.pt``.

    Writes ``metrics.json`` (the last weights' numbers at the top level, ``best.pt``'s under ``"best"``, each
    naming its checkpoint and epoch), ``metrics.csv`` (last) and ``metrics_best.csv``.

    Args:
        run: the finished training run.

    Returns:
        The contents of ``metrics.json`` without the per-case rows.
    """
    config, run_dir = run.config, run.run_dir
    best = _score_best(run)
    rows, summary = evaluate_cases(run.raw_model, run.splits.test, config, run.device, config["train"]["progress"])
    write_metrics_csv(rows, run_dir / "metrics.csv")
    payload = {
        "checkpoint": "checkpoint.pt",
        "epoch": config["train"]["epochs"],
        "split": "test",
        "data_root": str(Path(config["data"]["root"]).resolve()),
        **metrics_record(rows, summary),
    }
    if best is not None:
        payload["best"] = best
    write_text_atomic(run_dir / "metrics.json", json.dumps(payload, indent=2))
    plot_run(run_dir)
    print(f"test split, checkpoint.pt (last epoch, {config['train']['epochs']}):")
    print(format_table(rows, summary))
    result = {k: v for k, v in payload.items() if k != "per_case"}
    if best is not None:
        result["best"] = {k: v for k, v in best.items() if k != "per_case"}
    return result


__getattr__ = deprecated_names(
    __name__, {"build_model": "rcps_train.model.build_model", "memory_format": "rcps_train.model.memory_format"}
)
