"""What is particular to backend="torch" (the plain PyTorch InfoNCE): its anchor tiles and
negative blocks, walked with an online log-sum-exp, match the float64 reference however the
problem is cut; no tensor of anchors x K x C (nor anchors x K) is ever made; and a fuzz run
against the reference. The op template's cases run it in test_infonce*.py like every backend.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rcps_kernels as rk
from rcps_kernels.ops import infonce_torch
from tests.kernels.op_template import TORCH, check_infonce, infonce_case, infonce_run, random_grad_out


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few anchors and blocks of 5 negatives: many tiles, several blocks per anchor."""
    monkeypatch.setattr(infonce_torch, "TILE_ELEMENTS", 120)
    monkeypatch.setattr(infonce_torch, "BLOCK_NEGATIVES", 5)


@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_many_tiles_and_blocks_match_the_reference(small_tiles, sampling, reduction):
    # K = 23: four full blocks of 5 and a partial one; 3 classes, so topk tiles end at class bounds.
    feats, logits = infonce_case((5, 4, 3), channels=6, classes=3, pool_spatial=(4, 4, 3), batch=2, seed=9)
    loss_shape = logits[0][:, 0].shape if reduction == "none" else ()
    kw = dict(confidence_threshold=0.5) if sampling == "random" else {}
    check_infonce(
        TORCH,
        feats,
        logits,
        num_negatives=23,
        sampling=sampling,
        reduction=reduction,
        grad_out=random_grad_out(loss_shape),
        **kw,
    )


@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_blocking_does_not_change_the_result_beyond_rounding(monkeypatch, sampling):
    feats, logits = infonce_case((6, 5, 4), channels=8, classes=2, seed=3)
    kw = dict(num_negatives=40, sampling=sampling, reduction="none")
    whole = infonce_run("torch", feats, logits, **kw)
    monkeypatch.setattr(infonce_torch, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(infonce_torch, "BLOCK_NEGATIVES", 7)
    blocked = infonce_run("torch", feats, logits, **kw)
    for name, value in whole.items():  # float32: other summation orders, same values to ~1e-7
        scale = value.abs().max().item()
        torch.testing.assert_close(
            blocked[name], value, rtol=1e-5, atol=1e-6 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_no_tensor_grows_with_anchors_times_k(monkeypatch, sampling):
    # 240 anchors, C = 4, K = 300: anchors x K = 72k elements, anchors x K x C = 288k. With a
    # 4096-element tile budget, nothing may exceed the tile or the features (the normalised
    # anchors and positives are stacked: 2 x 240 x 4).
    monkeypatch.setattr(infonce_torch, "TILE_ELEMENTS", 4096)
    feats, logits = infonce_case((8, 6, 5), channels=4, classes=2, pool_spatial=(8, 8, 7), seed=1)
    leaves = [f.float().requires_grad_() for f in feats]
    kw = dict(num_negatives=300, sampling=sampling)
    if sampling == "random":
        kw["generator"] = torch.Generator().manual_seed(0)
    with _LargestTensor() as watch:
        rk.bidirectional_voxel_infonce(*leaves, *logits, backend="torch", **kw).backward()
    bound = max(2 * leaves[0].numel(), leaves[2].numel(), 4096)
    assert 0 < watch.largest <= bound, f"a tensor of {watch.largest} elements (bound {bound})"
    with _LargestTensor() as reference:  # the watch sees a materialising implementation
        rk.bidirectional_voxel_infonce(*leaves, *logits, backend="reference", **kw).backward()
    assert reference.largest >= 240 * 300 * 4
