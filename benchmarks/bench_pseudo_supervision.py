"""Fused vs plain PyTorch L_urp + L_cr, forward+backward, CPU fp32 (docs/design.md section 6).

One step is one deep-supervision head's share of an RCPS step: ``L_urp(z_a1, z_o) +
L_urp(z_a2, z_o) + L_cr(z_a1, z_a2)`` followed by backward, with the two augmented views z_a1,
z_a2 requiring grad and the teacher z_o detached. Three forms: "fused", the one-op
``rk.pseudo_supervision_losses`` (backend "cpu"); "separate", the two fused functions called one
by one; "plain", the plain PyTorch reference. Shapes: LA (2, 2, 112, 112, 80) and Pancreas
(2, 17, 96, 96, 96); RCPS_BENCH_SMALL=1 swaps in tiny shapes so that
``python -m pytest benchmarks/bench_pseudo_supervision.py --benchmark-disable`` runs in seconds.

As a script, ``python -m benchmarks.bench_pseudo_supervision`` times the forms side by side
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
from benchmarks.shapes import bench_small

SHAPES = {"la": (2, 2, 112, 112, 80), "pancreas": (2, 17, 96, 96, 96)}
SMALL_SHAPES = {"la": (2, 2, 16, 16, 8), "pancreas": (2, 17, 8, 8, 8)}
FORMS = {"fused": ("cpu", True), "separate": ("cpu", False), "plain": ("reference", False)}
RESULTS = Path(__file__).resolve().parent / "results"


def shapes() -> dict[str, tuple[int, ...]]:
    return SMALL_SHAPES if bench_small() else SHAPES


def make_inputs(shape: tuple[int, ...], seed: int = 0):
    """z_a1, z_a2 (leaves requiring grad) and the teacher z_o, fp32 logits."""
    generator = torch.Generator().manual_seed(seed)
    z_a1 = torch.randn(shape, generator=generator).mul_(2).requires_grad_()
    z_a2 = torch.randn(shape, generator=generator).mul_(2).requires_grad_()
    z_o = torch.randn(shape, generator=generator).mul_(2)
    return z_a1, z_a2, z_o


def step(backend: str, z_a1: torch.Tensor, z_a2: torch.Tensor, z_o: torch.Tensor, one_op: bool = True) -> float:
    """One head's L_urp(z_a1, z_o) + L_urp(z_a2, z_o) + L_cr(z_a1, z_a2) and its backward."""
    if one_op:
        urp, cr = rk.pseudo_supervision_losses(z_a1, z_a2, z_o, backend=backend)
    else:
        urp = rk.rectified_pseudo_supervision(z_a1, z_o, backend=backend) + rk.rectified_pseudo_supervision(
            z_a2, z_o, backend=backend
        )
        cr = rk.logit_cosine_consistency(z_a1, z_a2, backend=backend)
    loss = urp + cr
    loss.backward()
    z_a1.grad = None
    z_a2.grad = None
    return float(loss.detach())


@pytest.mark.parametrize("shape_name", ["la", "pancreas"])
@pytest.mark.parametrize("form", list(FORMS))
def test_urp_cr_forward_backward(benchmark, form, shape_name):
    inputs = make_inputs(shapes()[shape_name])
    backend, one_op = FORMS[form]
    loss = benchmark(step, backend, *inputs, one_op)
    assert loss == loss  # finite work happened (not NaN)


def _memory_child(form: str, shape_name: str) -> None:
    backend, one_op = FORMS[form]
    step(backend, *make_inputs((1, 2, 4, 4, 4)), one_op)  # load the extension, warm allocators
    inputs = make_inputs(shapes()[shape_name])
    rss_before = reset_peak()
    step(backend, *inputs, one_op)
    print(json.dumps({"peak_bytes": peak_growth(rss_before)}))


def _time(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    inputs = make_inputs(shape)
    samples = {form: [] for form in FORMS}
    for backend, one_op in FORMS.values():
        step(backend, *inputs, one_op)  # warm-up
    for _ in range(rounds):  # interleaved, so that load from other processes hits every form
        for form, (backend, one_op) in FORMS.items():
            start = time.perf_counter()
            step(backend, *inputs, one_op)
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
    return {
        form: measure_in_subprocess("benchmarks.bench_pseudo_supervision", ["--memory-child", form, shape_name])[
            "peak_bytes"
        ]
        for form in FORMS
    }


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
        rows.append(
            {
                "shape_name": shape_name,
                "shape": list(shape),
                "rounds": rounds,
                "input_bytes": input_bytes,
                "time_s": times,
                "peak_bytes": memory,
                "peak_bytes_default_malloc": default_malloc,
                "speedup": times["plain"] / times["fused"],
                "memory_ratio": memory["fused"] / memory["plain"],
                "memory_ratio_default_malloc": default_malloc["fused"] / default_malloc["plain"],
            }
        )
        print(json.dumps(rows[-1]))

    report = {
        "benchmark": "one head's L_urp(z_a1) + L_urp(z_a2) + L_cr forward+backward, fp32, CPU: "
        "fused (one op), separate (two fused ops), plain PyTorch (reference)",
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "goal_la": "fused >= 10x faster and <= 1/6 of the plain peak memory",
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "_small" if bench_small() else ""
    (RESULTS / f"pseudo_supervision_cpu{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    mib = 1 << 20
    lines = [
        "# One head's L_urp + L_cr, forward+backward, CPU fp32: fused vs plain PyTorch",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['threads']} torch threads; torch {report['torch']}; {report['date']}.",
        "Time: median of interleaved rounds. Memory: peak RSS growth over the inputs (z_a1, z_a2, "
        "z_o) of one step in a fresh process, gradients included; tight: MALLOC_MMAP_THRESHOLD_=65536 "
        "(RSS follows the live tensors), default: glibc's default allocator settings.",
        "",
        "| shape | inputs | form | time | peak (tight) | peak (default malloc) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for form in FORMS:
            lines.append(
                f"| {tuple(r['shape'])} | {r['input_bytes'] / mib:.0f} MiB | {form} "
                f"| {r['time_s'][form] * 1e3:.1f} ms | {r['peak_bytes'][form] / mib:.0f} MiB "
                f"| {r['peak_bytes_default_malloc'][form] / mib:.0f} MiB |"
            )
        lines.append(
            f"| {tuple(r['shape'])} | | fused vs plain | {r['speedup']:.1f}x faster "
            f"| {_as_fraction(r['memory_ratio'])} | {_as_fraction(r['memory_ratio_default_malloc'])} |"
        )
    lines += ["", f"Goal at (2, 2, 112, 112, 80): {report['goal_la']}.", ""]
    (RESULTS / f"pseudo_supervision_cpu{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
