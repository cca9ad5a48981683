"""The training loop: set-up, epochs, one RCPS (or supervised) step, validation, checkpoints, test scoring.

A run folder ``<run.out_dir>/<run.name>`` holds ``config.toml`` (resolved), ``train_log.csv`` (one row per
step), ``val_log.csv`` (validation-split Dice per scored epoch), ``checkpoint.pt`` (the last state), ``best.pt``
(the weights of the best validation Dice, with a validation split), PNG plots, ``tensorboard/`` (with
``log.tensorboard``) and, at the end, the test split's ``metrics.csv`` / ``metrics.json`` (and
``metrics_best.csv``). The test split is read once before the first step to check its files, and predicted only
after the last step, for both checkpoints: it never chooses anything.
Checkpoints, RNG streams and the CSV logs are written and read back through :mod:`rcps_train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rcps_kernels._backend import BACKENDS, resolve_backend

from . import distributed as ddp
from .augment import intensity_view
from .checkpoint import (
    append_row,
    check_fresh_run_folder,
    check_output_folder,
    checkpoint_to_resume,
    restore_rng,
    rng_states,
    save_atomic,
    start_clean,
    truncate_log,
)
from .config import ConfigError, to_toml, validate
from .data import (
    PairedPatchDataset,
    Splits,
    VolumeStore,
    case_spacing,
    check_cases,
    data_changes,
    data_record,
    dataset_splits,
    epoch_plan,
    seed_worker,
)
from .evaluate import distance_unit, evaluate_cases, format_table, metrics_record, write_metrics_csv
from .files import write_text_atomic
from .losses import TERMS, learning_rate, ramp_weight, rcps_loss_terms, segmentation_loss, total_loss
from .model import ProjectorUNet
from .plots import plot_run
from .prepare import PREPROCESSING_FILE, read_preprocessing
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
        resolve_backend(backend, device, tuple(name for name in BACKENDS if name != "auto"))
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"loss.backend = {backend!r} cannot run on {device}: {err}") from None


def build_model(config: dict, in_channels: int) -> ProjectorUNet:
    """The network of ``config`` for images of ``in_channels`` channels."""
    return ProjectorUNet(
        in_channels,
        config["data"]["num_classes"],
        config["model"]["widths"],
        config["model"]["project_dim"],
        config["model"]["checkpointing"],
    )


def memory_format(config: dict) -> torch.memory_format:
    """The layout of the model and its inputs (``model.channels_last``): channels_last_3d cuts the peak memory
    of a CPU step at the LA patch, but small CPU configs run faster in the default NCDHW layout."""
    return torch.channels_last_3d if config["model"]["channels_last"] else torch.contiguous_format


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _forward(model, batch: dict, config: dict, device: torch.device, amp_dtype, augment_generator):
    """One forward over the labeled patch (with, for RCPS, its two views and the unlabeled patch with
    its two), under autocast. Returns the float32 outputs, the labeled image and its label."""
    x_l, y_l = batch["image_l"].to(device, non_blocking=True), batch["label_l"].to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        if config["train"]["method"] == "rcps":
            x_u = batch["image_u"].to(device, non_blocking=True)
            views = [intensity_view(x, augment_generator) for x in (x_l, x_l, x_u, x_u)]
            inputs = torch.cat([x_l, views[0], views[1], x_u, views[2], views[3]])
        else:
            inputs = x_l
        outputs = model(inputs.contiguous(memory_format=memory_format(config)))
    # The losses run in float32 whatever the forward precision (the kernels accumulate in fp32 anyway).
    return {name: value.float() for name, value in outputs.items()}, x_l, y_l


def train_step(
    model,
    batch: dict,
    optimizer,
    scaler,
    config: dict,
    ramp: float,
    device: torch.device,
    amp_dtype,
    augment_generator: torch.Generator,
    negative_generator: torch.Generator | None = None,
    gather_negatives=None,
) -> dict[str, float]:
    """One optimisation step (docs/design.md section 1.1): views, one forward over 6 volumes, all losses, update.

    Args:
        model: ProjectorUNet (or its DDP wrapper), in train mode.
        batch: ``image_l``, ``label_l``, ``image_u`` tensors ``(B, 1, *patch)``.
        optimizer, scaler: SGD and a ``torch.amp.GradScaler`` (disabled unless fp16).
        config: the run config.
        ramp: the ramp-up weight of this epoch.
        amp_dtype: autocast dtype, or None for full precision.
        augment_generator: CPU generator of the intensity views.
        negative_generator: generator for ``loss.sampling = "random"``.
        gather_negatives: cross-rank negative pooling (DDP), or None.

    Returns:
        Floats: ``loss`` and every term (nan for terms the method does not use).
    """
    loss_cfg = config["loss"]
    outputs, x_l, y_l = _forward(model, batch, config, device, amp_dtype, augment_generator)
    class_weights = torch.tensor(loss_cfg["class_weights"], device=device)
    if config["train"]["method"] == "rcps":
        terms = rcps_loss_terms(
            outputs, y_l, x_l.shape[0], loss_cfg, class_weights, gather_negatives, negative_generator
        )
    else:
        terms = {"seg": segmentation_loss(outputs, y_l, class_weights, loss_cfg["ce_lambda"])}
    loss = total_loss(terms, ramp, loss_cfg)
    loss_value = loss.detach()
    if not torch.isfinite(loss_value):
        raise FloatingPointError(
            f"non-finite loss {loss_value.item()} (terms: "
            + ", ".join(f"{k}={v.detach().item():.4g}" for k, v in terms.items())
            + ")"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    # One device-to-host copy for all the logged numbers (each .item() would sync on its own).
    present = [name for name in TERMS if name in terms]
    numbers = torch.stack([loss_value.float(), *(terms[n].detach().float() for n in present)]).tolist()
    values = dict.fromkeys(TERMS, float("nan"))
    values.update(zip(present, numbers[1:]))
    return {"loss": numbers[0], **values}


@dataclass
class TrainingRun:
    """What a training run carries from step to step: where it runs, what it trains, and how far it got.

    ``epoch``/``step_in_epoch`` always name the next step to take (the position a checkpoint resumes from).
    """

    config: dict
    device: torch.device
    rank: int
    world_size: int
    amp_dtype: torch.dtype | None
    run_dir: Path
    splits: Splits
    dataset: PairedPatchDataset
    model: torch.nn.Module  # what the steps call: the DDP wrapper in a distributed run
    raw_model: ProjectorUNet  # what is saved, validated and tested
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]  # "augment" (intensity views), "negatives" (random sampling)
    gather: Callable | None  # the cross-rank negative pool, or None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    val_history: list[dict] = field(default_factory=list)
    tensorboard: TensorBoardLog | None = None  # main process with log.tensorboard only
    preprocessing: dict | None = None  # data.root's preprocessing.json (rcps-train prepare), saved with the weights
    data: dict = field(default_factory=dict)  # the data the run started with (data_record), checked on --resume

    @property
    def main(self) -> bool:
        return self.rank == 0


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
            result = _score_test_split(run.raw_model, run.splits, config, device, run.run_dir)
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
    amp_dtype, use_scaler = amp_settings(config, device)
    check_loss_backend(config, device)
    if config["log"]["tensorboard"]:
        require_tensorboard()
    main = rank == 0
    run_dir = Path(config["run"]["out_dir"]) / config["run"]["name"]
    state = checkpoint_to_resume(config, run_dir / "checkpoint.pt", resume, main, device)
    if main and resume:
        check_output_folder(run_dir, "run folder")
    elif main:
        check_fresh_run_folder(run_dir, overwrite)
    generators = _seed(config["run"]["seed"], rank)
    splits, dataset = _read_data(config, main)
    model, raw_model = _build_parallel_model(config, splits.channels, device, world_size)
    train_cfg = config["train"]
    optimizer = torch.optim.SGD(
        model.parameters(), lr=train_cfg["lr"], momentum=train_cfg["momentum"], weight_decay=train_cfg["weight_decay"]
    )
    run = TrainingRun(
        config,
        device,
        rank,
        world_size,
        amp_dtype,
        run_dir,
        splits,
        dataset,
        model,
        raw_model,
        optimizer,
        torch.amp.GradScaler(device.type, enabled=use_scaler),
        generators,
        ddp.gather_negative_pool if config["loss"]["cross_rank_negatives"] and world_size > 1 else None,
    )
    run.preprocessing = read_preprocessing(config["data"]["root"])
    run.data = data_record(splits)
    if resume:
        _restore(run, state)
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
        if config["log"]["tensorboard"]:
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
    data_cfg = config["data"]
    splits = dataset_splits(data_cfg)
    classes, channels = data_cfg["num_classes"], splits.channels
    dataset = PairedPatchDataset(
        VolumeStore(splits.labeled, classes, channels, data_cfg["cache"]),
        VolumeStore(splits.unlabeled, classes, channels, data_cfg["cache"]),
        data_cfg["patch_size"],
        data_cfg["grid_distortion_prob"],
        data_cfg["grid_distortion_limit"],
        data_cfg["grid_distortion_cells"],
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


def _build_parallel_model(
    config: dict, channels: int, device: torch.device, world_size: int
) -> tuple[torch.nn.Module, ProjectorUNet]:
    """``(model the steps call, raw model)``: the DDP wrapper and the network inside it in a distributed run
    (with SyncBatchNorm on CUDA), the network twice otherwise."""
    model = build_model(config, channels).to(device, memory_format=memory_format(config))
    if world_size == 1:
        return model, model
    if device.type == "cuda":  # SyncBatchNorm has no CPU implementation
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapper = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=config["train"]["method"] == "supervised",
    )
    return wrapper, model


def _restore(run: TrainingRun, state: dict) -> None:
    """Continue ``run`` from a checkpoint's weights, optimizer, scaler, position, history and RNG streams."""
    stored_channels = state.get("in_channels", 1)  # checkpoints from before multi-channel data were 1-channel
    if stored_channels != run.splits.channels:
        raise ConfigError(
            f"--resume: {run.run_dir / 'checkpoint.pt'} was trained on {stored_channels}-channel images but the "
            f"images under data.root = {run.config['data']['root']!r} have {run.splits.channels} channel(s)"
        )
    changes = data_changes(state["data"], run.data) if "data" in state else []
    if changes:
        raise ConfigError(
            f"--resume: the data under data.root = {run.config['data']['root']!r} changed since "
            f"{run.run_dir / 'checkpoint.pt'} was written ({'; '.join(changes)}); restore it or start a new run.name"
        )
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.step_in_epoch, run.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
    run.val_history = state["val_history"]
    restore_rng(state["rng"][run.rank] if isinstance(state["rng"], list) else state["rng"], run.generators)


def run_epoch(run: TrainingRun) -> bool:
    """Train from ``run``'s position to the end of its epoch (validating and checkpointing as configured).

    Returns:
        True when ``train.stop_after_steps`` stopped the run inside the epoch.
    """
    train_cfg = run.config["train"]
    epochs, batch_size = train_cfg["epochs"], train_cfg["batch_size"]
    lr = learning_rate(
        run.epoch, epochs, train_cfg["lr"], train_cfg["warmup_epochs"], train_cfg["warmup_lr"], train_cfg["poly_power"]
    )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    ramp = ramp_weight(run.epoch, train_cfg["rampup_epochs"] or epochs)
    plan = epoch_plan(
        len(run.splits.labeled),
        len(run.splits.unlabeled),
        run.epoch,
        run.config["run"]["seed"],
        run.rank,
        run.world_size,
        train_cfg["max_steps_per_epoch"],
        batch_size,
    )
    steps = len(plan) // batch_size
    loader = DataLoader(
        run.dataset,
        batch_size=batch_size,
        sampler=plan[run.step_in_epoch * batch_size :],
        num_workers=run.config["data"]["num_workers"],
        worker_init_fn=seed_worker,
        pin_memory=run.device.type == "cuda",
    )
    bar = tqdm(
        loader,
        total=steps,
        initial=run.step_in_epoch,
        desc=f"epoch {run.epoch + 1}/{epochs}",
        disable=not (run.main and train_cfg["progress"]),
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
    values = train_step(
        run.model,
        batch,
        run.optimizer,
        run.scaler,
        run.config,
        ramp,
        run.device,
        run.amp_dtype,
        run.generators["augment"],
        run.generators["negatives"],
        run.gather,
    )
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
    train_cfg = run.config["train"]
    stop = bool(train_cfg["stop_after_steps"]) and run.global_step >= train_cfg["stop_after_steps"]
    if run.step_in_epoch == steps:
        run.epoch, run.step_in_epoch = run.epoch + 1, 0
    if stop or run.step_in_epoch == 0 or run.global_step % train_cfg["checkpoint_every"] == 0:
        if run.step_in_epoch == 0:
            _validate_during_training(run)
        save_checkpoint(run)
    return stop


def save_checkpoint(run: TrainingRun) -> None:
    """Write ``checkpoint.pt`` (main process) with the state to continue ``run`` from its next step, including
    every rank's RNG streams, so that each resumes its own."""
    rng = rng_states(run.generators)
    if run.world_size > 1:
        gathered = [None] * run.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if run.main:
        if run.tensorboard is not None:  # events up to this checkpoint survive a kill
            run.tensorboard.flush()
        save_atomic(
            {
                "model": run.raw_model.state_dict(),
                "in_channels": run.splits.channels,
                "preprocessing": run.preprocessing,
                "data": run.data,
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(),
                "epoch": run.epoch,
                "step_in_epoch": run.step_in_epoch,
                "global_step": run.global_step,
                "rng": rng,
                "val_history": run.val_history,
                "config": run.config,
            },
            run.run_dir / "checkpoint.pt",
        )


def _validate_during_training(run: TrainingRun) -> None:
    """Score the validation split after an epoch when ``eval.every_epochs`` says so, and after the last one;
    keep the weights of the best mean Dice so far as ``best.pt`` (main process only)."""
    config, epochs_done = run.config, run.epoch
    every = config["eval"]["every_epochs"]
    if not ddp.is_main_process() or not run.splits.validation or not every:
        return
    if epochs_done % every and epochs_done != config["train"]["epochs"]:
        return
    cases = run.splits.validation[: config["eval"]["max_cases"] or None]
    previews = []

    def keep_first_preview(case, image, label, prediction):
        if not previews:
            previews.append((case.name, image, label, prediction))

    _, summary = evaluate_cases(run.raw_model, cases, config, run.device, False, keep_first_preview)
    best_so_far = max((entry["dice"] for entry in run.val_history), default=-1.0)
    run.val_history.append({"epoch": epochs_done, **summary})
    if summary["dice"] > best_so_far:
        save_atomic(
            {
                "model": run.raw_model.state_dict(),
                "in_channels": run.splits.channels,
                "preprocessing": run.preprocessing,
                "config": config,
                "epoch": epochs_done,
                "val_dice": summary["dice"],
                "val_cases": [c.name for c in cases],
            },
            run.run_dir / "best.pt",
        )
    append_row(run.run_dir / "val_log.csv", VAL_FIELDS, {"epoch": epochs_done, **summary})
    if run.tensorboard is not None:
        run.tensorboard.log_validation(summary, run.global_step, previews[0], config["data"]["num_classes"])
    plot_run(run.run_dir)


def _score_test_split(model, splits, config: dict, device, run_dir: Path) -> dict:
    """Score the test split once with the last weights and, when there is one, with ``best.pt``.

    Writes ``metrics.json`` (the last weights' numbers at the top level, ``best.pt``'s under ``"best"``, each
    naming its checkpoint and epoch), ``metrics.csv`` (last) and ``metrics_best.csv``.

    Returns:
        The contents of ``metrics.json`` without the per-case rows.
    """
    progress = config["train"]["progress"]
    best_path = run_dir / "best.pt"
    best = None
    if splits.validation and best_path.exists():
        state = torch.load(best_path, map_location=device, weights_only=False)
        best_model = build_model(config, splits.channels).to(device, memory_format=memory_format(config))
        best_model.load_state_dict(state["model"])
        rows, summary = evaluate_cases(best_model, splits.test, config, device, progress)
        write_metrics_csv(rows, run_dir / "metrics_best.csv")
        best = {
            "checkpoint": "best.pt",
            "epoch": state["epoch"],
            "val_dice": state["val_dice"],
            "val_cases": len(state["val_cases"]),
            **metrics_record(rows, summary),
        }
        print(f"test split, best.pt (epoch {state['epoch']}, validation Dice {state['val_dice']:.4f}):")
        print(format_table(rows, summary))
    rows, summary = evaluate_cases(model, splits.test, config, device, progress)
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
