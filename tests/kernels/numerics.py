"""The correctness rule of docs/design.md section 5, shared by all kernel tests.

A kernel passes when its error against the float64 reference is at most `factor` times the
error of the reference run in the kernel's own dtype, plus `atol` (the CCE / flash-attention
rule). Reports the worst element on failure.
"""

from __future__ import annotations

import torch

#: Absolute slack per input dtype, on top of the same-dtype reference's own error.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def assert_close_to_reference(
    actual: torch.Tensor,
    same_dtype_reference: torch.Tensor,
    float64_reference: torch.Tensor,
    *,
    dtype: torch.dtype,
    factor: float = 2.0,
    name: str = "value",
) -> None:
    """Elementwise |actual - gt| <= factor * |ref - gt| + atol, with gt the float64 result."""
    assert actual is not float64_reference and actual is not same_dtype_reference
    assert actual.shape == float64_reference.shape, (
        f"{name}: shape {tuple(actual.shape)} != reference {tuple(float64_reference.shape)}"
    )
    gt = float64_reference.detach().double().cpu()
    err = (actual.detach().double().cpu() - gt).abs()
    ref_err = (same_dtype_reference.detach().double().cpu() - gt).abs()
    # atol is relative to the largest value compared (gradients of a mean over anchors are
    # small), with a floor for tensors that are analytically ~0 (e.g. gradients through the
    # normalisation of 1-channel features), where only rounding residue is left.
    scale = max(gt.abs().max().item() if gt.numel() else 0.0, 1e-2)
    bound = factor * ref_err + ATOL[dtype] * scale
    bad = ~(err <= bound)
    if bad.any():
        i = int(torch.argmax((err - bound).masked_fill(~bad, float("-inf")).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements out of tolerance; worst at flat "
            f"index {i}: actual={actual.detach().double().cpu().flatten()[i].item():.8g} "
            f"float64={gt.flatten()[i].item():.8g} "
            f"same-dtype reference={same_dtype_reference.detach().double().cpu().flatten()[i].item():.8g} "
            f"(err {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g})"
        )


def confident_features(*, channels=8, spatial=(6, 5), pool_spatial=(5, 4), seed=0):
    """Anchor, positive (= anchor) and pool features, float64, for a case of confident anchors.

    Every anchor lies near one direction d and every pool voxel near cos 0.65 to d, so with
    temperature 0.05 each direction's loss is about K exp(-7) ~ 1e-3 per anchor: far below the
    ulp of the logits (1/tau = 20). A kernel that forms the loss as lse - x loses it there.
    """
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(channels, dtype=torch.float64)
    d[0] = 1.0
    near_d = 0.65 * d
    near_d[1] = (1 - 0.65**2) ** 0.5

    def around(direction, spatial_shape):
        noise = torch.randn(1, channels, *spatial_shape, generator=g, dtype=torch.float64)
        return direction.view(1, -1, *[1] * len(spatial_shape)) + 0.02 * noise

    anchor = around(d, spatial)
    return [anchor, anchor.clone(), around(near_d, pool_spatial)]


def assert_relative_error_below(actual, float64_reference, *, rtol, name="value"):
    """Elementwise |actual - gt| <= rtol |gt|: for values the same-dtype reference itself gets
    wrong in relative terms (the tiny losses of confident anchors), where the rule above is loose."""
    gt = float64_reference.detach().double().cpu()
    rel = (actual.detach().double().cpu() - gt).abs() / gt.abs().clamp_min(1e-30)
    worst = rel.max().item()
    assert worst <= rtol, f"{name}: relative error {worst:.3g} > {rtol:g}"
