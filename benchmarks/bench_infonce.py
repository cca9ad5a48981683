"""pytest-benchmark suite of the voxel InfoNCE on the CPU: forward+backward at the LA shape.

    python -m pytest benchmarks/bench_infonce.py                 # full sizes (minutes: the
                                                                 # official algorithm at K=400
                                                                 # takes over a minute a round)
    RCPS_BENCH_SMALL=1 python -m pytest benchmarks --benchmark-disable   # smoke run (CI)

Side by side: the fused kernel (backend="cpu"), the tiled plain PyTorch backend (backend="torch"),
the plain PyTorch reference, the authors' algorithm (benchmarks/official_baseline.py) and the
matmul floor (the six N x C x K products). Peak memory is measured separately, per process, by
``python -m benchmarks.la_compare`` and ``python -m benchmarks.torch_backend_compare``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.infonce_case import floor_fn, loss_fn
from benchmarks.shapes import bench_small, make_inputs

SHAPE = "small" if bench_small() else "la"
#: The official algorithm and the reference materialise K x anchors x C: one round is enough.
ROUNDS = {"fused": 5, "torch": 3, "floor": 5, "reference": 2, "official": 1}


def fwd_bwd(impl: str, k: int, shape: str = SHAPE):
    if impl == "floor":
        return floor_fn(shape, k)
    fn, inputs = loss_fn(impl, k), make_inputs(shape)

    def step():
        for t in inputs[:3]:
            t.grad = None
        fn(*inputs).backward()

    return step


@pytest.mark.parametrize("k", [100, 400])
@pytest.mark.parametrize("impl", ["fused", "torch", "floor", "reference", "official"])
def test_infonce_la_forward_backward(benchmark, impl, k):
    torch.manual_seed(0)
    step = fwd_bwd(impl, k)
    step()  # warm-up
    benchmark.extra_info.update(shape=SHAPE, k=k, impl=impl, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=ROUNDS[impl], iterations=1)


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_infonce_la_large_k(benchmark, impl):
    k = 4096
    step = fwd_bwd(impl, k)
    step()
    benchmark.extra_info.update(shape=SHAPE, k=k, impl=impl)
    benchmark.pedantic(step, rounds=3, iterations=1)


def test_infonce_full_resolution_fused(benchmark):
    shape = "small" if bench_small() else "full"
    step = fwd_bwd("fused", 4096, shape)
    benchmark.extra_info.update(shape=shape, k=4096, impl="fused")
    benchmark.pedantic(step, rounds=1, iterations=1)
