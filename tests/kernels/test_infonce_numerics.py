"""The voxel InfoNCE at the numeric edges: small temperatures and huge and tiny feature norms on
every backend; float64 computed in double (gradcheck) on the CPU and torch backends, and the
temperatures refused."""

from __future__ import annotations

import pytest
import torch

import rcps_kernels as rk
from rcps_kernels.functional import MIN_TEMPERATURE
from tests.kernels.numerics import assert_relative_error_below
from tests.kernels.op_template import CPU, INFONCE_TARGETS, check_infonce, infonce_case, infonce_run, targets

# The interpreter evaluates masked-out lanes too ((-inf) - (-inf), and exp of logits ~1/tau);
# numpy warns, and the lanes are discarded.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)


@pytest.mark.parametrize("target", targets(*INFONCE_TARGETS))
@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("temperature", [1e-4, 1e-8, 1e-20, 1e-37])
def test_small_temperatures_keep_loss_and_gradients_exact(target, sampling, temperature):
    # Logits ~1/tau: an exponent formed as one FMA (S * inv_tau - max) or a softmax weight formed
    # as exp(logit - lse) is off by exp(+-ulp(1/tau)): 37 % at 1e-8, NaN below 1e-10. K = 16
    # draws from a small pool repeat negatives (exact ties) in random mode.
    feats, logits = infonce_case((4, 3, 2), channels=8, classes=2, pool_spatial=(3, 2, 2), seed=4)
    actual, exact = check_infonce(
        target, feats, logits, num_negatives=16, sampling=sampling, temperature=temperature, reduction="none", seed=2
    )
    assert (exact["loss"] * temperature > 0.1).any()  # some anchors are dominated by a negative
    assert_relative_error_below(actual["loss"], exact["loss"], rtol=1e-5, name="loss")


def test_small_temperature_with_a_bank_past_the_per_thread_copy_budget():
    # K * C above the CPU kernel's copies' budget: at 1/tau >= 40 the bank gradient must not be
    # recomputed in other GEMM shapes (their rounding, times 1/tau, moved the dominant weights 44x).
    feats, logits = infonce_case((3, 3, 2), channels=64, pool_spatial=(24, 24, 12), classes=2)
    check_infonce(CPU, feats, logits, num_negatives=3000, temperature=1e-8)


@pytest.mark.parametrize("target", targets(*INFONCE_TARGETS))
@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("temperature,scale", [(0.1, 1e-30), (0.1, 1e19), (0.1, 1e30), (1e-6, 1e30)])
def test_huge_and_tiny_feature_norms(target, sampling, temperature, scale):
    # The squared norm of z * 1e19 overflows float32: such features were normalised as zero.
    feats, logits = infonce_case((4, 3, 2), channels=6, classes=2, pool_spatial=(3, 3, 2), seed=5)
    kw = dict(num_negatives=7, sampling=sampling, temperature=temperature, seed=3)
    actual, _ = check_infonce(target, [f * scale for f in feats], logits, **kw)
    if scale > 1:
        # u does not depend on the scale, so the loss does not, and the gradients scale by
        # 1/scale: compared at scale 1 (the rule's tolerance is vacuous for gradients ~1/scale).
        unscaled = infonce_run(target.backend, [f.float().to(target.device) for f in feats], logits, **kw)
        torch.testing.assert_close(actual["loss"], unscaled["loss"], rtol=1e-5, atol=0)
        for name in ("grad_anchor", "grad_positive", "grad_pool"):
            want = unscaled[name].double()
            torch.testing.assert_close(
                actual[name].double() * scale, want, rtol=1e-4, atol=1e-6 * want.abs().max().item(), msg=name
            )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_float64_is_computed_in_double(backend, sampling, reduction):
    feats, logits = infonce_case((3, 2, 2), channels=5, classes=3, pool_spatial=(2, 3, 2), dtype=torch.float64)
    kw = dict(num_negatives=4, sampling=sampling, reduction=reduction, temperature=0.07, seed=6)
    got = infonce_run(backend, feats, logits, **kw)
    want = infonce_run("reference", feats, logits, **kw)
    for name, x in got.items():
        y = want[name]
        assert x.dtype == torch.float64, name
        torch.testing.assert_close(
            x, y, rtol=1e-12, atol=1e-12 * y.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_on_the_double_backends(backend, sampling, reduction):
    feats, logits = infonce_case((2, 2, 2), channels=4, classes=3, pool_spatial=(2, 2, 2), dtype=torch.float64)
    leaves = [f.clone().requires_grad_() for f in feats]

    def loss_fn(anchor, positive, pool):
        gen = torch.Generator().manual_seed(8) if sampling == "random" else None
        return rk.bidirectional_voxel_infonce(
            anchor,
            positive,
            pool,
            *logits,
            num_negatives=3,
            sampling=sampling,
            temperature=0.2,
            reduction=reduction,
            generator=gen,
            backend=backend,
        )

    assert torch.autograd.gradcheck(loss_fn, leaves)


def test_mean_reduction_refuses_gradcheck_with_a_pointer_to_sum():
    feats, logits = infonce_case((2, 2, 2), channels=4, classes=3, pool_spatial=(2, 2, 2), dtype=torch.float64)
    leaves = [f.clone().requires_grad_() for f in feats]
    with pytest.raises(RuntimeError, match="reduction='sum' or 'none'"):
        torch.autograd.gradcheck(
            lambda a, p, n: rk.bidirectional_voxel_infonce(a, p, n, *logits, num_negatives=3, backend="cpu"), leaves
        )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_temperatures_whose_loss_overflows_float32_are_refused(backend):
    feats, logits = infonce_case((3, 2, 2), channels=5, classes=3, pool_spatial=(2, 3, 2))
    with pytest.raises(ValueError, match=r"temperature must be >= 2\.351e-38 \(2\*\*-125\)"):
        rk.bidirectional_voxel_infonce(*feats, *logits, temperature=1e-40, backend=backend)
    loss = rk.bidirectional_voxel_infonce(
        *[f.float() for f in feats],
        *logits,
        temperature=MIN_TEMPERATURE,
        num_negatives=4,
        reduction="none",
        backend=backend,
    )
    assert torch.isfinite(loss).all() and loss.max() > 1e37


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_summed_loss_that_overflows_float32_is_refused_not_returned_as_inf(backend):
    # Each anchor's loss is ~1/tau = 2**124 here, finite; 216 of them summed (or added up before
    # the mean divides) pass float32's 3.4e38. Finite inputs must not give a silent inf.
    feats, logits = infonce_case((6, 6, 6), channels=8, classes=2, pool_spatial=(6, 6, 6), seed=5)
    kw = dict(num_negatives=16, temperature=2.0**-124, backend=backend)
    per_anchor = rk.bidirectional_voxel_infonce(*feats, *logits, reduction="none", **kw)
    assert torch.isfinite(per_anchor).all() and per_anchor.max() > 2.0**120
    for reduction in ("sum", "mean"):
        with pytest.raises(
            ValueError, match="overflowed torch.float32 although every input is finite.*raise the temperature"
        ):
            rk.bidirectional_voxel_infonce(*feats, *logits, reduction=reduction, **kw)
