"""One benchmark case of the voxel InfoNCE, run in its own process (time + peak memory).

    python -m benchmarks.infonce_case --impl fused --shape la --k 400 --repeats 5

impl: fused (backend="cpu"), torch (backend="torch", plain PyTorch in tiles), reference,
official (the authors' algorithm), floor (the six N x C x K torch.mm products the loss needs:
S = U N^T, P N and P^T U, for both directions).
Prints one JSON line: median/min/max seconds of forward+backward and peak memory growth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.memory import peak_growth, reset_peak
from benchmarks.official_baseline import official_infonce
from benchmarks.shapes import SHAPES, make_inputs


def loss_fn(impl: str, k: int):
    import rcps_kernels as rk

    if impl == "official":
        return lambda *x: official_infonce(*x, num_negatives=k, temperature=0.1)
    backend = {"fused": "cpu", "torch": "torch", "reference": "reference"}[impl]
    return lambda *x: rk.bidirectional_voxel_infonce(*x, num_negatives=k, temperature=0.1, backend=backend)


def floor_fn(shape: str, k: int):
    """The six products at this size, on random operands (their values do not matter)."""
    spatial, channels = SHAPES[shape]
    n = 1
    for s in spatial:
        n *= s
    u, bank, p = torch.randn(n, channels), torch.randn(k, channels), torch.randn(n, k)

    def run():
        for _ in range(2):  # two directions
            torch.mm(u, bank.t())
            torch.mm(p, bank)
            torch.mm(p.t(), u)

    return run


def run_case(impl: str, shape: str, k: int, repeats: int, pool: str | None) -> dict:
    torch.manual_seed(0)
    if impl == "floor":
        step = floor_fn(shape, k)
    else:
        fn = loss_fn(impl, k)
        # Warm-up on a tiny problem: loads the extension and BLAS outside the measurement.
        small = make_inputs("small")
        fn(*small).backward()
        inputs = make_inputs(shape, pool_shape=pool)

        def step():
            for t in inputs[:3]:
                t.grad = None
            fn(*inputs).backward()

    rss = reset_peak()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = peak_growth(rss)
    times = [first]
    cpu_times = []  # CPU time of the process (all threads): less sensitive than wall time to other load
    for _ in range(repeats - 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if repeats > 1:
        times = times[1:]  # the first call also pays one-off costs (page faults of new buffers)
    return {
        "impl": impl,
        "shape": shape,
        "pool": pool or shape,
        "k": k,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "median_cpu_s": statistics.median(cpu_times) if cpu_times else None,
        "rounds": len(times),
        "peak_bytes": peak,
        "threads": torch.get_num_threads(),
        "cpu_variant": _cpu_variant() if impl == "fused" else None,
    }


def _cpu_variant() -> str | None:
    from rcps_kernels.extension import cpu_extension

    return cpu_extension().variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", required=True, choices=["fused", "torch", "reference", "official", "floor"])
    parser.add_argument("--shape", default="la", choices=sorted(SHAPES))
    parser.add_argument("--pool", default=None, choices=sorted(SHAPES))
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run_case(args.impl, args.shape, args.k, args.repeats, args.pool)))


if __name__ == "__main__":
    main()
