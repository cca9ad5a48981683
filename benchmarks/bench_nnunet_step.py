"""One training step of nnUNetTrainerRCPS vs nnU-Net's own nnUNetTrainer on the same plans (3d_fullres, nnU-Net's
planned network and batch size for a synthetic dataset), on CPU or the GPU: step time, peak memory, and the share
of the RCPS step spent inside the voxel InfoNCE. Each trainer runs in a fresh subprocess on a fixed batch (data
loading is not timed).

    python -m benchmarks.bench_nnunet_step [--shape 48 48 48] [--steps 2] [--warmup 1] [--k 400] [--device cpu]

Needs the ``nnunet`` extra. Writes benchmarks/results/nnunet_step_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TRAINERS = ("nnUNetTrainer", "nnUNetTrainerRCPS")


class _Timed:
    """Wraps a function and adds up the wall time spent in it (after a device sync)."""

    def __init__(self, function, device):
        self.function, self.device, self.seconds = function, device, 0.0

    def __call__(self, *args, **kwargs):
        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        result = self.function(*args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - start
        return result


def _trainer(name: str, folders: dict, device):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from rcps_nnunet.trainer import nnUNetTrainerRCPS
    from tests.nnunet_data import DATASET

    preprocessed = Path(folders["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    cls = nnUNetTrainerRCPS if name == "nnUNetTrainerRCPS" else nnUNetTrainer
    return cls(plans, "3d_fullres", 0, dataset_json, device=device)


def run_case(name: str, folders: dict, steps: int, warmup: int, device_name: str) -> dict:
    """In the child process: build the trainer, run ``warmup`` steps, then time ``steps`` steps."""
    import torch

    import rcps_kernels
    from benchmarks.memory import peak_growth, reset_peak
    from tests.nnunet_data import set_nnunet_environment

    set_nnunet_environment({key: Path(value) for key, value in folders.items()})
    device = torch.device(device_name)
    torch.manual_seed(0)
    trainer = _trainer(name, folders, device)
    trainer.on_train_start()
    batch = next(trainer.dataloader_train)
    if getattr(trainer, "dataloader_unlabeled", None) is not None:
        trainer.dataloader_unlabeled = itertools.repeat(next(trainer.dataloader_unlabeled))
    infonce = _Timed(rcps_kernels.bidirectional_voxel_infonce, device)
    rcps_kernels.bidirectional_voxel_infonce = infonce  # what rcps_nnunet.losses calls
    for _ in range(warmup):
        trainer.train_step(batch)
    infonce.seconds = 0.0
    rss_before = reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = {
        "step_s": seconds,
        "infonce_s": infonce.seconds / steps,
        "peak_growth_gb": peak_growth(rss_before) / 1e9,
        "batch_size": trainer.batch_size,
        "patch_size": list(trainer.configuration_manager.patch_size),
        "widths": trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"],
    }
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def write_results(results: dict, args) -> None:
    from importlib.metadata import version

    import torch

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "volume_shape": args.shape,
        "num_negatives": args.k,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
    }
    stem = f"nnunet_step_{args.device}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "cases": results}, indent=2))
    memory = "peak CUDA allocated (GB)" if args.device == "cuda" else "peak RSS growth (GB)"
    lines = [
        f"# nnUNetTrainerRCPS vs nnUNetTrainer: one 3d_fullres training step ({meta['device']})",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        f"| trainer | patch | batch | widths | step time (s) | {memory} | InfoNCE (s) | InfoNCE share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        peak = r.get("peak_cuda_gb", r["peak_growth_gb"])
        share = f"{100 * r['infonce_s'] / r['step_s']:.1f} %" if name == "nnUNetTrainerRCPS" else "-"
        infonce = f"{r['infonce_s']:.3f}" if name == "nnUNetTrainerRCPS" else "-"
        lines.append(
            f"| {name} | {r['patch_size']} | {r['batch_size']} | {r['widths']} | {r['step_s']:.2f} | {peak:.2f} "
            f"| {infonce} | {share} |"
        )
    lines += [
        "",
        "Both trainers run nnU-Net's planned network on the same plans and batch; the RCPS step forwards six "
        "patches per labeled one (plain + two intensity views of a labeled and of an unlabeled batch). InfoNCE "
        "time is the wall time inside `bidirectional_voxel_infonce` (two calls per step; its fused mean path "
        "computes the gradient in forward, so backward only scales it). CPU memory is the RSS high-water mark "
        "over the RSS before the timed steps. The machine is shared, so times are indicative.",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--folders", help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48], help="synthetic volume shape")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--k", type=int, default=400, help="InfoNCE negatives (RCPS setting num_negatives)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work", help="dataset folder (default: a new temporary folder)")
    args = parser.parse_args()
    os.environ["RCPS_NNUNET_SETTINGS"] = json.dumps({"num_negatives": args.k})
    if args.child:
        print(json.dumps(run_case(args.child, json.loads(args.folders), args.steps, args.warmup, args.device)))
        return
    from benchmarks.memory import measure_in_subprocess
    from tests.nnunet_data import prepared_nnunet

    work = Path(args.work or tempfile.mkdtemp(prefix="rcps-nnunet-bench-"))
    folders = prepared_nnunet(work, shape=args.shape, shrink=False, configurations=("3d_fullres",))
    folder_args = json.dumps({key: str(value) for key, value in folders.items()})
    common = ["--folders", folder_args, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    results = {}
    for name in TRAINERS:
        print(f"running {name} ...", flush=True)
        flags = [*common, "--k", str(args.k), "--device", args.device]
        results[name] = measure_in_subprocess("benchmarks.bench_nnunet_step", ["--child", name, *flags])
        print(json.dumps(results[name]), flush=True)
    write_results(results, args)


if __name__ == "__main__":
    main()
