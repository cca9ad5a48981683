"""PNG plots of a run folder's logs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .losses import TERMS  # noqa: E402


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_run(run_dir: str | Path) -> None:
    """Write ``loss_terms.png`` (every term, lr and ramp per step) and ``val_dice.png`` (Dice per epoch)."""
    run_dir = Path(run_dir)
    rows = _read(run_dir / "train_log.csv")
    if rows:
        steps = [int(r["global_step"]) for r in rows]
        fig, (ax_loss, ax_sched) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
        for name in ("loss", *TERMS):
            values = [float(r[name]) for r in rows]
            if any(v == v for v in values):  # skip terms the method does not use (all nan)
                ax_loss.plot(steps, values, label=name, linewidth=1)
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(ncol=4, fontsize=8)
        ax_sched.plot(steps, [float(r["lr"]) for r in rows], label="lr")
        ax_sched.set_ylabel("learning rate")
        ax_ramp = ax_sched.twinx()
        ax_ramp.plot(steps, [float(r["ramp"]) for r in rows], color="tab:orange", label="ramp")
        ax_ramp.set_ylabel("ramp weight")
        ax_sched.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(run_dir / "loss_terms.png", dpi=100)
        plt.close(fig)
    val = _read(run_dir / "val_log.csv")
    if val:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([int(r["epoch"]) for r in val], [float(r["dice"]) for r in val], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice")
        fig.tight_layout()
        fig.savefig(run_dir / "val_dice.png", dpi=100)
        plt.close(fig)


def plot_validation_curves(curves: dict[str, list[list[tuple[int, float]]]], path: str | Path) -> None:
    """Validation Dice over epochs per method: one thin line per seed and the mean over seeds in bold.

    Args:
        curves: method -> one ``[(epoch, dice), ...]`` list per seed (empty lists are skipped).
        path: the PNG to write.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, (method, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], curves.items()):
        runs = [run for run in runs if run]
        for run in runs:
            ax.plot(*zip(*run), color=colour, alpha=0.35, linewidth=1)
        epochs = sorted(set.intersection(*(set(e for e, _ in run) for run in runs))) if runs else []
        if epochs:
            mean = [sum(dict(run)[e] for run in runs) / len(runs) for e in epochs]
            ax.plot(epochs, mean, color=colour, linewidth=2.5, marker="o", label=f"{method} (mean of {len(runs)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
