"""Host-side cost of one fused voxel InfoNCE call (forward + backward, reduction="mean").

    python -m benchmarks.bench_host_overhead [--out results/host_overhead_cpu.md]
    TRITON_INTERPRET=1 python -m benchmarks.bench_host_overhead   # adds the triton backend

At the LA shape on an H100 one call spends 0.54 ms on the device but 2.4 ms of wall time: the
host issues the work (benchmarks/results/infonce_gpu_*). This measures that host side on any
machine, at a tiny shape where the kernels themselves cost next to nothing:

- kernel ops: aten ops dispatched per call that would each launch a kernel on a GPU (views,
  metadata and allocations excluded), plus Triton launches (counted under the interpreter);
- python torch calls: torch functions and tensor methods called from Python per call that
  reach the dispatcher (metadata reads excluded), each paying the Python binding on top;
- us per call: median wall time of the whole call on the CPU backend, one thread.

Counts are exact and machine-independent; the time is this machine's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that launch no kernel on a GPU: views, metadata, allocation without fill.
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "reshape",
    "as_strided",
    "detach",
    "t",
    "transpose",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "movedim",
    "permute",
    "alias",
    "expand",
    "lift_fresh",
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_like",
    "resolve_conj",
    "resolve_neg",
    "is_nonzero",
    "result_type",
    "requires_grad_",
    "_reshape_alias",
    "split",
    "unbind",
    "lift_fresh_copy",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "scalar_tensor",  # a wrapped CPU scalar, e.g. where(cond, x, -1)
}
#: Tensor methods answered from metadata, without dispatch.
METADATA = {
    "dim",
    "size",
    "stride",
    "numel",
    "nelement",
    "data_ptr",
    "is_contiguous",
    "element_size",
    "get_device",
    "is_floating_point",
    "storage_offset",
}


class _TritonLaunches:
    """Counts interpreted Triton launches; the interpreter's own torch calls are not counted."""

    def __init__(self):
        self.count = 0
        self.inside = False

    @contextlib.contextmanager
    def watch(self):
        if os.environ.get("TRITON_INTERPRET") != "1":
            yield
            return
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run

        def counting_run(fn, *args, **kwargs):
            self.count += 1
            self.inside = True
            try:
                return original(fn, *args, **kwargs)
            finally:
                self.inside = False

        InterpretedFunction.run = counting_run
        try:
            yield
        finally:
            InterpretedFunction.run = original


class _CountKernelOps(TorchDispatchMode):
    def __init__(self, triton: _TritonLaunches):
        super().__init__()
        self.ops = collections.Counter()
        self.triton = triton

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not self.triton.inside:
            self.ops[f"{func.namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self, triton: _TritonLaunches):
        super().__init__()
        self.calls = 0
        self.triton = triton

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Property getters, dunders and metadata reads do not reach the dispatcher.
        name = getattr(func, "__name__", "")
        if not (name.startswith("__") or name in METADATA or self.triton.inside):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, 16, 4, 4, 4, generator=g) for _ in range(3)]
    logits = [torch.randn(1, 2, 4, 4, 4, generator=g) for _ in range(2)]
    return feats, logits


def make_step(backend: str):
    import rcps_kernels as rk

    feats, logits = _inputs()

    def step():
        leaves = [t.detach().clone().requires_grad_() for t in feats]
        rk.bidirectional_voxel_infonce(*leaves, *logits, num_negatives=8, backend=backend).backward()

    return step


def measure(backend: str, timed: bool) -> dict:
    step = make_step(backend)
    step()  # warm-up: extension load, Triton (interpreter) set-up
    triton = _TritonLaunches()
    with triton.watch():
        with _CountKernelOps(triton) as kernel_ops:
            step()
        with _CountTorchCalls(triton) as torch_calls:
            step()
    result = {
        "kernel_ops": sum(kernel_ops.ops.values()),
        "by_op": dict(kernel_ops.ops),
        "python_torch_calls": torch_calls.calls,
    }
    if backend == "triton":
        result["triton_launches"] = triton.count // 2
    if timed:
        for _ in range(50):
            step()
        times = []
        for _ in range(15):
            start = time.perf_counter()
            for _ in range(40):
                step()
            times.append((time.perf_counter() - start) / 40 * 1e6)
        result["us_per_call"] = statistics.median(times)
        result["us_min"] = min(times)
    return result


def to_markdown(results: dict, label: str) -> str:
    lines = [
        f"# Host-side cost of one voxel InfoNCE call ({label})",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, 1 torch thread, {datetime.date.today().isoformat()}; "
        'shape (1, 16, 4, 4, 4), K = 8, forward + backward, reduction="mean"',
        "",
        "| backend | kernel ops | Triton launches | python torch calls | us per call (min) |",
        "|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        time_cell = f"{r['us_per_call']:.0f} ({r['us_min']:.0f})" if "us_per_call" in r else "interpreted: not timed"
        lines.append(
            f"| {backend} | {r['kernel_ops']} | {r.get('triton_launches', '-')} | "
            f"{r['python_torch_calls']} | {time_cell} |"
        )
    lines += ["", "Kernel ops by name:", ""]
    for backend, r in results.items():
        ops = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in sorted(r["by_op"].items()))
        lines.append(f"- {backend}: {ops}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--label", default="CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"cpu": measure("cpu", timed=True)}
    if os.environ.get("TRITON_INTERPRET") == "1":
        results["triton"] = measure("triton", timed=False)
    markdown = to_markdown(results, args.label)
    print(markdown)
    if args.out:
        Path(args.out).write_text(markdown)


if __name__ == "__main__":
    main()
