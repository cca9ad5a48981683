"""The training loop: set-up, one RCPS (or supervised) step, per-epoch schedule, logs, checkpoints, resume.

A run folder ``<run.out_dir>/<run.name>`` holds ``config.toml`` (resolved), ``train_log.csv`` (one row per
step), ``val_log.csv`` (validation-split Dice per scored epoch), ``checkpoint.pt`` (the last state), ``best.pt``
(the weights of the best validation Dice, with a validation split), PNG plots and, at the end, the test split's
``metrics.csv`` / ``metrics.json`` (and ``metrics_best.csv``). The test split is read once before the first step
to check its files, and predicted only after the last step, for both checkpoints: it never chooses anything.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rcps_kernels._backend import BACKENDS, resolve_backend

from . import distributed as ddp
from .augment import intensity_view
from .config import ConfigError, resume_changes, to_toml, validate
from .data import PairedPatchDataset, VolumeStore, check_cases, dataset_splits, epoch_plan, seed_worker
from .evaluate import evaluate_cases, format_table, metrics_record, write_metrics_csv
from .losses import TERMS, learning_rate, ramp_weight, rcps_loss_terms, segmentation_loss, total_loss
from .model import ProjectorUNet
from .plots import plot_run

RESUME_ENTRIES = ("model", "optimizer", "scaler", "epoch", "step_in_epoch", "global_step", "rng", "val_history",
                  "config")
VAL_FIELDS = ["epoch", "dice", "jaccard", "hd95", "asd", "num_undefined_distances", "distance_unit", "protocol",
              "largest_component"]
LOG_FIELDS = ["epoch", "step", "global_step", "lr", "ramp", "loss", *TERMS, "step_time_s", "peak_mem_mb"]
# Files a run writes into its folder; a fresh run (no checkpoint.pt) removes any left by an earlier attempt.
RUN_FILES = ("config.toml", "train_log.csv", "val_log.csv", "best.pt", "best.pt.tmp", "checkpoint.pt.tmp",
             "metrics.csv", "metrics_best.csv", "metrics.json", "loss_terms.png", "val_dice.png")


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
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return dtype, amp == "fp16"


def check_loss_backend(config: dict, device: torch.device) -> None:
    """Raise ConfigError when ``loss.backend`` cannot run on ``device`` (instead of failing at the first step)."""
    backend = config["loss"]["backend"]
    try:
        resolve_backend(backend, device, tuple(name for name in BACKENDS if name != "auto"))
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"loss.backend = {backend!r} cannot run on {device}: {err}") from None


def load_checkpoint(path: str | Path, map_location, entries: tuple[str, ...]) -> dict:
    """Read a checkpoint written by :func:`train`.

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
        raise ConfigError(f"{path} is not an rcps-train checkpoint: expected a dict with entries "
                          f"{', '.join(entries)}, found {found}")
    return state


def check_weights_fit(model: torch.nn.Module, weights: dict, config: dict, path: str | Path) -> None:
    """Raise ConfigError naming ``path`` when ``weights`` do not fit ``model`` (built from ``config``)."""
    expected = model.state_dict()
    if not isinstance(weights, dict):
        raise ConfigError(f"checkpoint {path}: 'model' holds a {type(weights).__name__}, expected a state dict")
    shapes = {name: tuple(getattr(value, "shape", ())) for name, value in weights.items()}
    head = f"heads.{len(model.heads) - 1}.weight"
    if head in shapes and shapes[head][:1] != expected[head].shape[:1]:
        raise ConfigError(f"checkpoint {path} holds weights for {shapes[head][0]} classes ({head} of shape "
                          f"{shapes[head]}) but its config has data.num_classes = {config['data']['num_classes']}")
    wrong = sorted(set(expected) ^ set(shapes)) + [name for name in expected
                                                   if name in shapes and shapes[name] != tuple(expected[name].shape)]
    if wrong:
        raise ConfigError(f"checkpoint {path}: its weights do not fit the model of its config (model.widths = "
                          f"{config['model']['widths']}, model.project_dim = {config['model']['project_dim']}); "
                          f"first differing entries: {wrong[:3]}")


def build_model(config: dict) -> ProjectorUNet:
    return ProjectorUNet(1, config["data"]["num_classes"], config["model"]["widths"],
                         config["model"]["project_dim"], config["model"]["checkpointing"])


def memory_format(config: dict) -> torch.memory_format:
    """The layout of the model and its inputs (``model.channels_last``): channels_last_3d cuts the peak memory
    of a CPU step at the LA patch, but small CPU configs run faster in the default NCDHW layout."""
    return torch.channels_last_3d if config["model"]["channels_last"] else torch.contiguous_format


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_step(model, batch: dict, optimizer, scaler, config: dict, ramp: float, device: torch.device,
               amp_dtype, augment_generator: torch.Generator, negative_generator: torch.Generator | None = None,
               gather_negatives=None) -> dict[str, float]:
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
    x_l, y_l = batch["image_l"].to(device, non_blocking=True), batch["label_l"].to(device, non_blocking=True)
    class_weights = torch.tensor(loss_cfg["class_weights"], device=device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    with autocast:
        if config["train"]["method"] == "rcps":
            x_u = batch["image_u"].to(device, non_blocking=True)
            views = [intensity_view(x, augment_generator) for x in (x_l, x_l, x_u, x_u)]
            inputs = torch.cat([x_l, views[0], views[1], x_u, views[2], views[3]])
        else:
            inputs = x_l
        outputs = model(inputs.contiguous(memory_format=memory_format(config)))
    # The losses run in float32 whatever the forward precision (the kernels accumulate in fp32 anyway).
    outputs = {name: value.float() for name, value in outputs.items()}
    if config["train"]["method"] == "rcps":
        terms = rcps_loss_terms(outputs, y_l, x_l.shape[0], loss_cfg, class_weights, gather_negatives,
                                negative_generator)
    else:
        terms = {"seg": segmentation_loss(outputs, y_l, class_weights, loss_cfg["ce_lambda"])}
    loss = total_loss(terms, ramp, loss_cfg)
    loss_value = loss.detach()
    if not torch.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss {loss_value.item()} (terms: "
                                 + ", ".join(f"{k}={v.detach().item():.4g}" for k, v in terms.items()) + ")")
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


def _save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename over ``path``: a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_states(generators: dict[str, torch.Generator]) -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              **{name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    for name, g in generators.items():
        g.set_state(states[name])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _truncate_log(path: Path, key: str, last: int) -> None:
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
    with open(path, "w", newline="") as f:
        if fields:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def _complete_row_at_most(row: dict, key: str, last: int) -> bool:
    """Whether a CSV row has every field (no torn line) and ``row[key] <= last``."""
    if None in row or None in row.values():  # csv marks missing fields with None values, extra ones with a None key
        return False
    try:
        return int(row.get(key, "")) <= last
    except ValueError:
        return False


def _append_row(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def train(config: dict, resume: bool = False) -> dict | None:
    """Run (or resume) a training run, then score the test split with the last (and the best) weights.

    Args:
        config: a resolved config (see :mod:`rcps_train.config`).
        resume: continue from ``<run folder>/checkpoint.pt``.

    Returns:
        The test metrics of the last weights, with those of ``best.pt`` under ``"best"`` when there is a
        validation split, on the main process (None on other ranks, or when stopped early).
    """
    validate(config)  # again: callers may have edited the dict (paths, names) since load_config
    run_cfg, data_cfg, train_cfg = config["run"], config["data"], config["train"]
    device = resolve_device(config, int(os.environ.get("LOCAL_RANK", "0")))
    rank, local_rank, world_size = ddp.init_distributed(device.type)
    main = rank == 0
    device = resolve_device(config, local_rank)
    amp_dtype, use_scaler = amp_settings(config, device)
    check_loss_backend(config, device)
    run_dir = Path(run_cfg["out_dir"]) / run_cfg["name"]
    checkpoint_path = run_dir / "checkpoint.pt"
    state = _checkpoint_to_resume(config, checkpoint_path, resume, main, device)
    if main and not resume:
        _start_clean(run_dir)

    seed = run_cfg["seed"]
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # the same initial weights on every rank
    generators = {"augment": torch.Generator().manual_seed(seed * 1009 + rank),
                  "negatives": torch.Generator().manual_seed(seed * 2003 + rank)}

    splits = dataset_splits(data_cfg)
    dataset = PairedPatchDataset(VolumeStore(splits.labeled, data_cfg["num_classes"], data_cfg["cache"]),
                                 VolumeStore(splits.unlabeled, data_cfg["num_classes"], data_cfg["cache"]),
                                 data_cfg["patch_size"], data_cfg["grid_distortion_prob"],
                                 data_cfg["grid_distortion_limit"], data_cfg["grid_distortion_cells"])
    check_cases(splits.validation + splits.test, data_cfg["num_classes"])  # before step 1, not after the last
    if main and config["eval"]["every_epochs"] and not splits.validation:
        print("rcps-train: no validation split (data.val_cases = 0): no validation during training and no best.pt; "
              "the test split is scored once, after the last epoch")

    model = build_model(config).to(device, memory_format=memory_format(config))
    raw_model = model
    if world_size > 1:
        if device.type == "cuda":  # SyncBatchNorm has no CPU implementation
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            raw_model = model
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                        find_unused_parameters=train_cfg["method"] == "supervised")
    optimizer = torch.optim.SGD(model.parameters(), lr=train_cfg["lr"], momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    gather = ddp.gather_negative_pool if config["loss"]["cross_rank_negatives"] and world_size > 1 else None

    epoch, step_in_epoch, global_step, val_history = 0, 0, 0, []
    if resume:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        val_history = state["val_history"]
        _restore_rng(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"], generators)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(config))
        if resume:
            _truncate_log(run_dir / "train_log.csv", "global_step", global_step)
            _truncate_log(run_dir / "val_log.csv", "epoch", epoch)

    def save_checkpoint(next_epoch: int, next_step: int) -> None:
        rng = _rng_states(generators)
        if world_size > 1:  # every rank's generators, so each resumes its own stream
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        if main:
            _save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "epoch": next_epoch, "step_in_epoch": next_step,
                          "global_step": global_step, "rng": rng, "val_history": val_history, "config": config},
                         checkpoint_path)

    epochs = train_cfg["epochs"]
    model.train()
    while epoch < epochs:
        lr = learning_rate(epoch, epochs, train_cfg["lr"], train_cfg["warmup_epochs"], train_cfg["warmup_lr"],
                           train_cfg["poly_power"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        ramp = ramp_weight(epoch, train_cfg["rampup_epochs"] or epochs)
        batch_size = train_cfg["batch_size"]
        plan = epoch_plan(len(splits.labeled), len(splits.unlabeled), epoch, seed, rank, world_size,
                          train_cfg["max_steps_per_epoch"], batch_size)
        steps = len(plan) // batch_size
        loader = DataLoader(dataset, batch_size=batch_size, sampler=plan[step_in_epoch * batch_size:],
                            num_workers=data_cfg["num_workers"], worker_init_fn=seed_worker,
                            pin_memory=device.type == "cuda")
        bar = tqdm(loader, total=steps, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not (main and train_cfg["progress"]), leave=False)
        for batch in bar:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            values = train_step(model, batch, optimizer, scaler, config, ramp, device, amp_dtype,
                                generators["augment"], generators["negatives"], gather)
            step_in_epoch += 1
            global_step += 1
            row = {"epoch": epoch, "step": step_in_epoch, "global_step": global_step, "lr": lr, "ramp": ramp,
                   **values, "step_time_s": time.perf_counter() - start, "peak_mem_mb": peak_memory_mb(device)}
            if main:
                _append_row(run_dir / "train_log.csv", LOG_FIELDS, row)
                bar.set_postfix(loss=f"{values['loss']:.3f}", seg=f"{values['seg']:.3f}")
            stop = train_cfg["stop_after_steps"] and global_step >= train_cfg["stop_after_steps"]
            if step_in_epoch == steps:
                epoch, step_in_epoch = epoch + 1, 0
            if stop or step_in_epoch == 0 or global_step % train_cfg["checkpoint_every"] == 0:
                if step_in_epoch == 0:
                    _validate_during_training(raw_model, splits.validation, config, device, epoch, val_history,
                                              run_dir)
                save_checkpoint(epoch, step_in_epoch)
            if stop:
                bar.close()
                ddp.barrier()
                return None
        bar.close()

    result = _score_test_split(raw_model, splits, config, device, run_dir) if main else None
    ddp.barrier()
    return result


def _start_clean(run_dir: Path) -> None:
    """A fresh run in a folder without a checkpoint: remove what an earlier attempt (killed before its first
    checkpoint) left, so that the logs never mix two runs."""
    stale = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    for path in stale:
        path.unlink()
    if stale:
        print(f"rcps-train: {run_dir} had no checkpoint; removed the files of an earlier attempt: "
              + ", ".join(p.name for p in stale))


def _checkpoint_to_resume(config: dict, checkpoint_path: Path, resume: bool, main: bool,
                          device: torch.device) -> dict | None:
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
        print(f"--resume with changed keys that leave the run as it was: {'; '.join(allowed_changes)} "
              f"(written to {checkpoint_path.parent / 'config.toml'})")
    return state


def _validate_during_training(model, val_cases, config, device, epochs_done: int, val_history: list,
                              run_dir: Path) -> None:
    """Score the validation split after an epoch when ``eval.every_epochs`` says so, and after the last one;
    keep the weights of the best mean Dice so far as ``best.pt`` (main process only)."""
    every = config["eval"]["every_epochs"]
    if not ddp.is_main_process() or not val_cases or not every:
        return
    if epochs_done % every and epochs_done != config["train"]["epochs"]:
        return
    cases = val_cases[:config["eval"]["max_cases"] or None]
    _, summary = evaluate_cases(model, cases, config, device, progress=False)
    best_so_far = max((entry["dice"] for entry in val_history), default=-1.0)
    val_history.append({"epoch": epochs_done, **summary})
    if summary["dice"] > best_so_far:
        _save_atomic({"model": model.state_dict(), "config": config, "epoch": epochs_done,
                      "val_dice": summary["dice"], "val_cases": [c.name for c in cases]}, run_dir / "best.pt")
    _append_row(run_dir / "val_log.csv", VAL_FIELDS, {"epoch": epochs_done, **summary})
    plot_run(run_dir)


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
        best_model = build_model(config).to(device, memory_format=memory_format(config))
        best_model.load_state_dict(state["model"])
        rows, summary = evaluate_cases(best_model, splits.test, config, device, progress)
        write_metrics_csv(rows, run_dir / "metrics_best.csv")
        best = {"checkpoint": "best.pt", "epoch": state["epoch"], "val_dice": state["val_dice"],
                "val_cases": len(state["val_cases"]), **metrics_record(rows, summary)}
        print(f"test split, best.pt (epoch {state['epoch']}, validation Dice {state['val_dice']:.4f}):")
        print(format_table(rows, summary))
    rows, summary = evaluate_cases(model, splits.test, config, device, progress)
    write_metrics_csv(rows, run_dir / "metrics.csv")
    payload = {"checkpoint": "checkpoint.pt", "epoch": config["train"]["epochs"], **metrics_record(rows, summary)}
    if best is not None:
        payload["best"] = best
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    plot_run(run_dir)
    print(f"test split, checkpoint.pt (last epoch, {config['train']['epochs']}):")
    print(format_table(rows, summary))
    result = {k: v for k, v in payload.items() if k != "per_case"}
    if best is not None:
        result["best"] = {k: v for k, v in best.items() if k != "per_case"}
    return result
