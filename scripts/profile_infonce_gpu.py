"""Where the time of one fused voxel InfoNCE call goes on a CUDA device (torch.profiler).

    python scripts/profile_infonce_gpu.py [--backend triton] [--k 400] [--shape la]

Prints the wall time of forward+backward (mean reduction) and the profiler's table of host
(CPU) and device (CUDA) time per op, so that launch and dispatch overhead can be told apart
from kernel time at small shapes.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_infonce_gpu import loss_callable, make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--shape", default="la")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    a, p, n, al, nl = make_inputs(args.shape, args.shape, torch.float32, "cuda")
    fn = loss_callable(args.backend, args.k)

    def step():
        leaves = [t.detach().clone().requires_grad_() for t in (a, p, n)]
        fn(*leaves, al, nl).backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print(f"{args.backend} {args.shape} K={args.k}: {1e3 * (time.perf_counter() - start) / 20:.3f} ms per call")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
