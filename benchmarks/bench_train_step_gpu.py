"""One RCPS training step at the LA patch on a CUDA device: step time and peak GPU memory.

    python -m benchmarks.bench_train_step_gpu [--steps 5] [--k 400] [--patch 112 112 80]

Cases (one process, one after another, the model rebuilt for each): the fused backends (auto) with
fp16 AMP, with and without block checkpointing, in fp32, and the plain-PyTorch reference backend
with fp16 AMP. Peak memory is torch.cuda.max_memory_allocated() over the timed steps, which
includes the model, optimizer state and inputs. Writes benchmarks/results/train_step_gpu_<device>.json
and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_infonce_gpu import write_results

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "fused, fp16 AMP, checkpointing": {"backend": "auto", "amp": "fp16", "checkpointing": True},
    "fused, fp16 AMP": {"backend": "auto", "amp": "fp16", "checkpointing": False},
    "fused, fp32": {"backend": "auto", "amp": "off", "checkpointing": False},
    "reference, fp16 AMP": {"backend": "reference", "amp": "fp16", "checkpointing": False},
}


def run_case(spec: dict, patch: list[int], k: int, steps: int, warmup: int) -> dict:
    from rcps_train.config import load_config
    from rcps_train.engine import amp_settings
    from rcps_train.model import build_model
    from rcps_train.step import StepContext, train_step

    device = torch.device("cuda")
    config = load_config(
        "la",
        [
            f'loss.backend="{spec["backend"]}"',
            f'train.amp="{spec["amp"]}"',
            f"model.checkpointing={str(spec['checkpointing']).lower()}",
            f"data.patch_size={patch}",
            f"loss.num_negatives={k}",
        ],
    )
    torch.manual_seed(0)
    model = build_model(config, 1, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    amp_dtype, use_scaler = amp_settings(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    label = torch.zeros(1, 1, *patch, dtype=torch.long)
    label[..., patch[0] // 4 : patch[0] // 2, patch[1] // 4 : patch[1] // 2, patch[2] // 4 : patch[2] // 2] = 1
    batch = {
        "image_l": (torch.randn(1, 1, *patch) + label).to(device),
        "label_l": label.to(device),
        "image_u": torch.randn(1, 1, *patch).to(device),
    }
    generator = torch.Generator().manual_seed(0)  # augmentation draws on CPU, as in the trainer
    context = StepContext(model, optimizer, scaler, config, device, amp_dtype, generator)

    def step(context=context, batch=batch):  # bound now: the names are deleted below
        return train_step(context, batch, 1.0)

    for _ in range(warmup):  # Triton compilation, cuDNN autotuning, optimizer state
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        values = step()  # ends in .item(): synchronised
        times.append(time.perf_counter() - start)
    result = {
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_terms": values,
    }
    del model, optimizer, batch, context
    torch.cuda.empty_cache()
    return result


def to_markdown(report: dict) -> str:
    lines = [
        f"# One RCPS training step on {report['device']}",
        "",
        f"torch {report['torch']}, CUDA {report['cuda']}, {report['date']}; LA config, patch "
        f"{report['patch']}, K = {report['k']}, {report['steps']} timed steps after "
        f"{report['warmup']} warm-up steps.",
        "",
        "| case | median step ms | min step ms | peak GPU GiB (model, optimizer, activations) |",
        "|---|---|---|---|",
    ]
    for name, r in report["cases"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} | {r['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_step_gpu needs a CUDA device")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "patch": args.patch,
        "k": args.k,
        "steps": args.steps,
        "warmup": args.warmup,
        "cases": {},
    }
    for name in args.cases:
        try:
            report["cases"][name] = run_case(CASES[name], args.patch, args.k, args.steps, args.warmup)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            torch.cuda.empty_cache()
            report["cases"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        print(json.dumps({name: report["cases"][name]}), flush=True)
    write_results(args.out_dir, "train_step_gpu", report, to_markdown(report))


if __name__ == "__main__":
    main()
