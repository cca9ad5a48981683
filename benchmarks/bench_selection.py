"""pytest-benchmark of the selection step: ``rcps_cpu::negative_tables`` against the same op sequence
issued from Python (rcps_kernels/ops/selection.py, the oracle of tests/kernels/test_selection.py).

    python -m pytest benchmarks/bench_selection.py
    RCPS_BENCH_SMALL=1 python -m pytest benchmarks --benchmark-disable   # smoke run (CI)

Two sizes: "tiny" (a 4x4x4 patch), where the time is the host issuing the ops, and the LA shape
(both logits 1 x 2 x 28 x 28 x 20), where it is the ops themselves. For the whole loss call, see
``python -m benchmarks.bench_host_overhead``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.shapes import bench_small, make_inputs
from rcps_kernels.ops.selection import negative_tables


def logits(size: str):
    """tiny: a 4x4x4 patch; la: the LA shape (the small CI shape under --benchmark-disable)."""
    if size == "tiny":
        g = torch.Generator().manual_seed(0)
        return torch.randn(1, 2, 4, 4, 4, generator=g), torch.randn(1, 2, 4, 4, 4, generator=g)
    return make_inputs("small" if bench_small() else "la")[3:]


@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("issued_from", ["cpp", "python"])
@pytest.mark.parametrize("size", ["tiny", "la"])
def test_negative_tables(benchmark, size, issued_from, sampling):
    anchor_logits, pool_logits = logits(size)
    args = (anchor_logits, pool_logits, 400, sampling == "random", 0.0)
    use_extension = issued_from == "cpp"
    expected = negative_tables(*args, use_extension=False)
    got = negative_tables(*args, use_extension=use_extension)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    benchmark.extra_info.update(size=size, issued_from=issued_from, sampling=sampling, threads=torch.get_num_threads())
    benchmark(negative_tables, *args, use_extension=use_extension)
