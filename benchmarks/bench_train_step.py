"""One RCPS training step at the LA patch on CPU, fp32: fused backends + block checkpointing vs the reference
backend without checkpointing. Each case runs in a fresh subprocess; the parent watches its RSS and stops it
above a limit (default 20 GB) so the 24 GB machine survives the reference run.

    python -m benchmarks.bench_train_step [--steps 1] [--limit-gb 20] [--patch 112 112 80] [--k 400]

Writes benchmarks/results/train_step_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "fused+checkpointing": {"backend": "auto", "checkpointing": True, "channels_last": True},
    "fused+checkpointing (NCDHW)": {"backend": "auto", "checkpointing": True, "channels_last": False},
    "fused": {"backend": "auto", "checkpointing": False, "channels_last": True},
    "reference": {"backend": "reference", "checkpointing": False, "channels_last": True},  # last: the largest
}


def run_case(
    backend: str, checkpointing: bool, channels_last: bool, patch: list[int], k: int, steps: int, warmup: int
) -> dict:
    """In the child process: build the full-width model, run ``warmup`` steps, then time ``steps`` steps."""
    import torch

    from benchmarks.memory import peak_growth, reset_peak
    from rcps_train.config import load_config
    from rcps_train.model import build_model
    from rcps_train.step import StepContext, train_step

    config = load_config(
        "la",
        [
            f'loss.backend="{backend}"',
            f"model.checkpointing={str(checkpointing).lower()}",
            f"model.channels_last={str(channels_last).lower()}",
            f"data.patch_size={patch}",
            f"loss.num_negatives={k}",
        ],
    )
    torch.manual_seed(0)
    model = build_model(config, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    label = torch.zeros(1, 1, *patch, dtype=torch.long)
    label[..., patch[0] // 4 : patch[0] // 2, patch[1] // 4 : patch[1] // 2, patch[2] // 4 : patch[2] // 2] = 1
    batch = {"image_l": torch.randn(1, 1, *patch) + label, "label_l": label, "image_u": torch.randn(1, 1, *patch)}
    context = StepContext(model, optimizer, scaler, config, augment_generator=torch.Generator().manual_seed(0))

    def step():
        return train_step(context, batch, 1.0)

    for _ in range(warmup):  # first-call allocations, extension loading, optimizer state
        step()
    rss_before = reset_peak()
    start = time.perf_counter()
    for _ in range(steps):
        values = step()
    seconds = (time.perf_counter() - start) / steps
    growth = peak_growth(rss_before)
    return {
        "step_s": seconds,
        "peak_growth_gb": growth / 1e9,
        "peak_rss_gb": (rss_before + growth) / 1e9,
        "loss_terms": values,
        "threads": torch.get_num_threads(),
    }


def measure(name: str, args, limit_bytes: float) -> dict:
    import psutil

    spec = CASES[name]
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_train_step",
        "--child",
        name,
        "--steps",
        str(args.steps),
        "--k",
        str(args.k),
        "--warmup",
        str(args.warmup),
        "--patch",
        *map(str, args.patch),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > limit_bytes:
            proc.kill()
            proc.wait()
            return {**spec, "skipped": f"stopped: RSS above the {limit_bytes / 1e9:.0f} GB limit"}
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {**spec, "skipped": f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"}
    return {**spec, **json.loads(out.strip().splitlines()[-1])}


def write_results(results: dict, args) -> None:
    import torch

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "patch": args.patch,
        "num_negatives": args.k,
        "precision": "fp32",
        "batch": "1 labeled + 1 unlabeled patch (6 volumes through the network)",
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step_cpu.json").write_text(json.dumps({"meta": meta, "cases": results}, indent=2))
    lines = [
        "# One RCPS training step on CPU (LA patch, fp32)",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| case | backend | block checkpointing | channels_last_3d | step time (s) | peak RSS (GB) "
        "| peak growth (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        row = f"| {name} | {r['backend']} | {r['checkpointing']} | {r['channels_last']} | "
        if "skipped" in r:
            lines.append(row + f"{r['skipped']} | | |")
        else:
            lines.append(row + f"{r['step_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['peak_growth_gb']:.2f} |")
    lines += [
        "",
        "Peak RSS is the whole process (model, optimizer state, inputs and the step); growth is the "
        "high-water mark over the RSS just before the step. The machine is shared, so times are indicative.",
    ]
    (RESULTS / "train_step_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--limit-gb", type=float, default=20.0)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    if args.child:
        spec = CASES[args.child]
        print(
            json.dumps(
                run_case(
                    spec["backend"],
                    spec["checkpointing"],
                    spec["channels_last"],
                    args.patch,
                    args.k,
                    args.steps,
                    args.warmup,
                )
            )
        )
        return
    results = {}
    for name in args.cases:
        print(f"running {name} ...", flush=True)
        results[name] = measure(name, args, args.limit_gb * 1e9)
        print(json.dumps(results[name]), flush=True)
    write_results(results, args)


if __name__ == "__main__":
    main()
