"""Fused vs plain PyTorch L_urp + L_cr, forward+backward, CPU fp32 (DESIGN.md section 6).

One step is ``rectified_pseudo_supervision(z_a1, z_o) + logit_cosine_consistency(z_a1, z_a2)``
followed by backward, with z_a1, z_a2 requiring grad and the teacher z_o detached: the per-head
work of an RCPS step. Shapes: LA (2, 2, 112, 112, 80) and Pancreas (2, 17, 96, 96, 96);
RCPS_BENCH_SMALL=1 swaps in tiny shapes so that
``python -m pytest benchmarks/bench_pseudo_supervision.py --benchmark-disable`` runs in seconds.

As a script, ``python -m benchmarks.bench_pseudo_supervision`` times both forms side by side
(interleaved rounds, median), measures the peak RSS growth over the inputs of one step of each in
a fresh subprocess (benchmarks/memory.py), and writes benchmarks/results/pseudo_supervision_cpu.json
and .md. Goal at the LA shape: fused >= 10x faster and <= 1/6 of the plain form's peak memory.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

import rcps_kernels as rk
from benchmarks.memory import measure_in_subprocess, peak_growth, reset_peak

SHAPES = {"la": (2, 2, 112, 112, 80), "pancreas": (2, 17, 96, 96, 96)}
SMALL_SHAPES = {"la": (2, 2, 16, 16, 8), "pancreas": (2, 17, 8, 8, 8)}
BACKENDS = {"fused": "cpu", "plain": "reference"}
RESULTS = Path(__file__).resolve().parent / "results"


def shapes() -> dict[str, tuple[int, ...]]:
    return SMALL_SHAPES if os.environ.get("RCPS_BENCH_SMALL", "0") == "1" else SHAPES


def make_inputs(shape: tuple[int, ...], seed: int = 0):
    """z_a1, z_a2 (leaves requiring grad) and the teacher z_o, fp32 logits."""
    generator = torch.Generator().manual_seed(seed)
    z_a1 = torch.randn(shape, generator=generator).mul_(2).requires_grad_()
    z_a2 = torch.randn(shape, generator=generator).mul_(2).requires_grad_()
    z_o = torch.randn(shape, generator=generator).mul_(2)
    return z_a1, z_a2, z_o


def step(backend: str, z_a1: torch.Tensor, z_a2: torch.Tensor, z_o: torch.Tensor) -> float:
    loss = (rk.rectified_pseudo_supervision(z_a1, z_o, backend=backend)
            + rk.logit_cosine_consistency(z_a1, z_a2, backend=backend))
    loss.backward()
    z_a1.grad = None
    z_a2.grad = None
    return float(loss)


@pytest.mark.parametrize("shape_name", ["la", "pancreas"])
@pytest.mark.parametrize("form", list(BACKENDS))
def test_urp_cr_forward_backward(benchmark, form, shape_name):
    inputs = make_inputs(shapes()[shape_name])
    loss = benchmark(step, BACKENDS[form], *inputs)
    assert loss == loss  # finite work happened (not NaN)


def _memory_child(form: str, shape_name: str) -> None:
    backend = BACKENDS[form]
    step(backend, *make_inputs((1, 2, 4, 4, 4)))  # load the extension, warm up allocators
    inputs = make_inputs(shapes()[shape_name])
    rss_before = reset_peak()
    step(backend, *inputs)
    print(json.dumps({"peak_bytes": peak_growth(rss_before)}))


def _time(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    inputs = make_inputs(shape)
    samples = {form: [] for form in BACKENDS}
    for form, backend in BACKENDS.items():
        step(backend, *inputs)  # warm-up
    for _ in range(rounds):  # interleaved, so that load from other processes hits both forms
        for form, backend in BACKENDS.items():
            start = time.perf_counter()
            step(backend, *inputs)
            samples[form].append(time.perf_counter() - start)
    return {form: statistics.median(values) for form, values in samples.items()}


def _peaks(shape_name: str, tight: bool) -> dict[str, int]:
    """Peak RSS growth of one step of each form, each in a fresh process. tight: every allocation
    over 64 KiB gets its own mapping, returned on free, so that RSS follows the live tensors;
    else glibc's defaults, whose heap reuse also counts freed-but-kept memory."""
    if tight:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the subprocesses
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    return {form: measure_in_subprocess("benchmarks.bench_pseudo_supervision",
                                        ["--memory-child", form, shape_name])["peak_bytes"]
            for form in BACKENDS}


def _as_fraction(ratio: float) -> str:
    return f"1/{1 / ratio:.1f}" if ratio > 0 else "~0 (below RSS resolution)"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-child", nargs=2, metavar=("FORM", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return

    rows = []
    for shape_name, shape in shapes().items():
        rounds = args.rounds if shape_name == "la" else max(3, args.rounds // 2)
        times = _time(shape, rounds)
        memory = _peaks(shape_name, tight=True)
        default_malloc = _peaks(shape_name, tight=False)
        input_bytes = 3 * torch.Size(shape).numel() * 4
        rows.append({
            "shape_name": shape_name, "shape": list(shape), "rounds": rounds,
            "input_bytes": input_bytes,
            "fused_time_s": times["fused"], "plain_time_s": times["plain"],
            "speedup": times["plain"] / times["fused"],
            "fused_peak_bytes": memory["fused"], "plain_peak_bytes": memory["plain"],
            "memory_ratio": memory["fused"] / memory["plain"],
            "fused_peak_default_malloc_bytes": default_malloc["fused"],
            "plain_peak_default_malloc_bytes": default_malloc["plain"],
            "memory_ratio_default_malloc": default_malloc["fused"] / default_malloc["plain"],
        })
        print(json.dumps(rows[-1]))

    report = {
        "benchmark": "L_urp + L_cr forward+backward, fp32, CPU: fused (backend='cpu') vs plain "
                     "PyTorch (backend='reference')",
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "goal_la": "fused >= 10x faster and <= 1/6 of the plain peak memory",
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "_small" if os.environ.get("RCPS_BENCH_SMALL", "0") == "1" else ""
    (RESULTS / f"pseudo_supervision_cpu{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    mib = 1 << 20
    lines = [
        "# L_urp + L_cr, forward+backward, CPU fp32: fused vs plain PyTorch",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['threads']} torch threads; torch {report['torch']}; {report['date']}.",
        "Time: median of interleaved rounds. Memory: peak RSS growth over the inputs (z_a1, z_a2, "
        "z_o) of one step in a fresh process, gradients included; tight: MALLOC_MMAP_THRESHOLD_=65536 "
        "(RSS follows the live tensors), default: glibc's default allocator settings.",
        "",
        "| shape | inputs | fused time | plain time | speedup | fused peak (tight) | plain peak (tight) "
        "| memory ratio (tight) | fused / plain peak (default malloc) | memory ratio (default malloc) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['input_bytes'] / mib:.0f} MiB | {r['fused_time_s'] * 1e3:.1f} ms "
            f"| {r['plain_time_s'] * 1e3:.1f} ms | {r['speedup']:.1f}x "
            f"| {r['fused_peak_bytes'] / mib:.0f} MiB | {r['plain_peak_bytes'] / mib:.0f} MiB "
            f"| {_as_fraction(r['memory_ratio'])} | {r['fused_peak_default_malloc_bytes'] / mib:.0f} / "
            f"{r['plain_peak_default_malloc_bytes'] / mib:.0f} MiB | {_as_fraction(r['memory_ratio_default_malloc'])} |"
        )
    lines += ["", f"Goal at (2, 2, 112, 112, 80): {report['goal_la']}.", ""]
    (RESULTS / f"pseudo_supervision_cpu{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
