"""``rcps-train compare``: train every method x seed from one config, then tabulate and plot the results.

The output folder holds one run folder per method and seed (``<method>-seed<seed>``), ``comparison.csv`` and
``comparison.md`` (per-seed rows and mean +- sample std over seeds of every test metric, for the last weights and
for ``best.pt``) and ``val_dice.png`` (validation Dice over epochs per method). A run folder that already holds
finished metrics from the same resolved config is reused and an interrupted one is resumed, so the command can be
re-run after a kill; a folder trained from another config or on data that changed since is an error. Every
(method, seed) config, its run folder and the data are checked before the first run starts, and every file is
written atomically (a torn ``metrics.json`` left by a kill counts as not written).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

from .checkpoint import check_output_folder, load_checkpoint
from .config import ConfigError, load_config, to_toml
from .data import data_changes, data_record, dataset_splits
from .files import read_json, write_csv_atomic, write_text_atomic
from .plots import plot_validation_curves

METRICS = ("dice", "jaccard", "hd95", "asd")  # reported when the run's metrics.json has them
CHECKPOINTS = (("last", None), ("best", "best"))  # label, key of metrics.json (None: the top level)


def _finished(run_dir: Path) -> bool:
    metrics = read_json(run_dir / "metrics.json")
    return metrics is not None and "checkpoint" in metrics


def _check_run_folder(config: dict, run_dir: Path, data: dict) -> None:
    """Refuse a run folder of another config, or a finished run trained on data that has changed since."""
    if (run_dir / "config.toml").exists() and (run_dir / "config.toml").read_text() != to_toml(config):
        raise ConfigError(
            f"{run_dir} holds a run of another config (its config.toml differs); "
            f"choose another --out or remove the folder"
        )
    if _finished(run_dir) and (run_dir / "checkpoint.pt").exists():
        stored = load_checkpoint(run_dir / "checkpoint.pt", "cpu", ("config",)).get("data")
        changes = data_changes(stored, data) if stored else []
        if changes:
            raise ConfigError(
                f"{run_dir} was trained on other data ({'; '.join(changes)}); choose another --out to train anew"
            )


def plan_runs(config_path: str, methods: list[str], seeds: list[int], overrides, out: Path) -> list[tuple]:
    """Every ``(method, seed, config)`` of a comparison, checked before any run starts: the configs with the
    device and backend, duplicated methods or seeds, the output folder, and the runs already in it."""
    from .engine import amp_settings, check_loss_backend, resolve_device

    for name, values in (("--methods", methods), ("--seeds", seeds)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ConfigError(f"{name} lists {', '.join(repeated)} more than once")
    check_output_folder(out, "--out")
    runs = []
    for seed in seeds:
        for method in methods:
            config = load_config(config_path, [*overrides, f"run.seed={seed}", f'train.method="{method}"'])
            config["run"]["out_dir"], config["run"]["name"] = str(out), f"{method}-seed{seed}"
            device = resolve_device(config)
            amp_settings(config, device)
            check_loss_backend(config, device)
            runs.append((method, seed, config))
    data = data_record(dataset_splits(runs[0][2]["data"]))  # method and seed leave the data and its splits alone
    for method, seed, config in runs:
        _check_run_folder(config, out / f"{method}-seed{seed}", data)
    return runs


def _run_one(config: dict, run_dir: Path) -> float:
    """Train (or resume, or reuse) one run; returns the wall seconds spent now."""
    from .engine import train

    if _finished(run_dir):
        return 0.0
    start = time.perf_counter()
    train(config, resume=(run_dir / "checkpoint.pt").exists())
    return time.perf_counter() - start


def _result_rows(method: str, seed: int, metrics: dict) -> list[dict]:
    """One row per checkpoint scored on the test split."""
    rows = []
    for label, key in CHECKPOINTS:
        part = metrics if key is None else metrics.get(key)
        if part is None:
            continue
        rows.append(
            {
                "method": method,
                "seed": seed,
                "checkpoint": part["checkpoint"],
                "epoch": part["epoch"],
                **{name: part[name] for name in METRICS if name in part},
                "num_undefined_distances": part.get("num_undefined_distances", 0),
            }
        )
    return rows


def _read_val_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "val_log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(row["epoch"]), float(row["dice"])) for row in csv.DictReader(f)]


def _mean_std(values: list) -> tuple[float, float]:
    """Mean and sample std (n - 1), nan-skipping (None is a distance JSON could not hold)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.mean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def summarise(rows: list[dict]) -> list[dict]:
    """Mean +- std over seeds per method and checkpoint.

    Returns:
        One dict per (method, checkpoint) with ``seeds`` and ``<metric>_mean`` / ``<metric>_std``.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["checkpoint"]), []).append(row)
    summary = []
    for (method, checkpoint), group in groups.items():
        entry = {"method": method, "checkpoint": checkpoint, "seeds": len(group)}
        for name in METRICS:
            if name in group[0]:
                entry[f"{name}_mean"], entry[f"{name}_std"] = _mean_std([r[name] for r in group])
        summary.append(entry)
    return summary


def _fmt(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_tables(rows: list[dict], summary: list[dict], out: Path, header: list[str]) -> None:
    """``comparison.csv`` (per-seed rows, then mean and std rows) and ``comparison.md``."""
    metrics = [name for name in METRICS if name in rows[0]]
    fields = ["method", "seed", "checkpoint", "epoch", *metrics, "num_undefined_distances", "minutes"]
    statistics_rows = [
        {
            "method": entry["method"],
            "seed": stat,
            "checkpoint": entry["checkpoint"],
            **{name: entry[f"{name}_{stat}"] for name in metrics},
        }
        for entry in summary
        for stat in ("mean", "std")
    ]
    write_csv_atomic(out / "comparison.csv", fields, rows + statistics_rows)
    digits = {"dice": 4, "jaccard": 4}
    lines = [
        *header,
        "",
        "Mean +- sample std over seeds (test split):",
        "",
        "| method | checkpoint | seeds | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for e in summary:
        cells = [
            f"{_fmt(e[f'{m}_mean'], digits.get(m, 2))} +- {_fmt(e[f'{m}_std'], digits.get(m, 2))}" for m in metrics
        ]
        lines.append(f"| {e['method']} | {e['checkpoint']} | {e['seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed:",
        "",
        "| method | seed | checkpoint | epoch | " + " | ".join(metrics) + " | undefined distances | minutes |",
        "|---|---|---|---|" + "---|" * (len(metrics) + 2),
    ]
    for r in rows:
        cells = [_fmt(r[m], digits.get(m, 2)) for m in metrics]
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['checkpoint']} | {r['epoch']} | "
            + " | ".join(cells)
            + f" | {r['num_undefined_distances']} | {_fmt(r['minutes'], 1)} |"
        )
    write_text_atomic(out / "comparison.md", "\n".join(lines) + "\n")


def run_comparison(
    config_path: str,
    methods: list[str],
    seeds: list[int],
    overrides: list[str] = (),
    out_dir: str | Path = "runs/compare",
) -> Path:
    """Train every method and seed, then write the table and the plot.

    Args:
        config_path: a TOML file or a shipped config name.
        methods: values of ``train.method``.
        seeds: values of ``run.seed`` (weights, crops, augmentation; data and splits stay fixed).
        overrides: ``key=value`` strings applied to every run.
        out_dir: the folder for the runs and the results.

    Returns:
        The output folder.
    """
    out = Path(out_dir)
    runs = plan_runs(config_path, methods, seeds, overrides, out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = read_json(timings_path) or {}
    rows, curves = [], {}
    for method, seed, config in runs:
        name = config["run"]["name"]
        seconds = _run_one(config, out / name)
        if seconds:
            timings[name] = seconds
            write_text_atomic(timings_path, json.dumps(timings, indent=2))
        metrics = read_json(out / name / "metrics.json")
        minutes = timings.get(name, math.nan) / 60
        rows += [{**row, "minutes": minutes} for row in _result_rows(method, seed, metrics)]
        curves.setdefault(method, []).append(_read_val_curve(out / name))
    import torch

    header = [
        f"# {' vs '.join(methods)}: `rcps-train compare --config {config_path}`",
        "",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}, machine: {platform.node()} "
        f"({'CUDA' if torch.cuda.is_available() else 'CPU'}), torch {torch.__version__}, seeds {list(seeds)}"
        + (f", overrides {list(overrides)}" if overrides else ""),
        f"Per run: {config['train']['epochs']} epochs, data.labeled = {config['data']['labeled']}, "
        f"data.val_cases = {config['data']['val_cases']}; `last` = checkpoint.pt after the last epoch, "
        f"`best` = best.pt (highest validation Dice); each is scored once on the test split.",
    ]
    write_tables(rows, summarise(rows), out, header)
    plot_validation_curves(curves, out / "val_dice.png")
    return out
