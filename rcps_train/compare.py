"""``rcps-train compare``: train every method x seed from one config, then tabulate and plot the results.

The output folder holds one run folder per method and seed (``<method>-seed<seed>``), ``comparison.csv`` and
``comparison.md`` (per-seed rows and mean +- sample std over seeds of every test metric, for the last weights and
for ``best.pt``) and ``val_dice.png`` (validation Dice over epochs per method). A run folder that already holds
finished metrics from the same resolved config is reused and an interrupted one is resumed, so the command can be
re-run after a kill; a folder trained from another config is an error.
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

from .config import ConfigError, load_config, to_toml
from .plots import plot_validation_curves

METRICS = ("dice", "jaccard", "hd95", "asd")  # reported when the run's metrics.json has them
CHECKPOINTS = (("last", None), ("best", "best"))  # label, key of metrics.json (None: the top level)


def _run_one(config: dict, run_dir: Path) -> float:
    """Train (or resume, or reuse) one run; returns the wall seconds spent now."""
    from .engine import train

    if (run_dir / "config.toml").exists() and (run_dir / "config.toml").read_text() != to_toml(config):
        raise ConfigError(
            f"{run_dir} holds a run of another config (its config.toml differs); "
            f"choose another --out or remove the folder"
        )
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and "checkpoint" in json.loads(metrics_path.read_text()):  # a finished run
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
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        for entry in summary:
            for stat in ("mean", "std"):
                writer.writerow(
                    {
                        "method": entry["method"],
                        "seed": stat,
                        "checkpoint": entry["checkpoint"],
                        **{name: entry[f"{name}_{stat}"] for name in metrics},
                    }
                )
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
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


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
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    rows, curves = [], {}
    for seed in seeds:
        for method in methods:
            config = load_config(config_path, [*overrides, f"run.seed={seed}", f'train.method="{method}"'])
            name = f"{method}-seed{seed}"
            config["run"]["out_dir"], config["run"]["name"] = str(out), name
            seconds = _run_one(config, out / name)
            if seconds:
                timings[name] = seconds
                timings_path.write_text(json.dumps(timings, indent=2))
            metrics = json.loads((out / name / "metrics.json").read_text())
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
