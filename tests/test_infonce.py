"""The fused CPU voxel InfoNCE against the float64 reference (docs/design.md section 5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rcps_kernels as rk
from rcps_kernels.ops import infonce as ops
from rcps_kernels.reference.infonce import philox_randint, random_negative_draws_reference
from rcps_kernels.selection import eligible_negatives, pseudo_labels
from tests.numerics import (assert_close_to_reference, assert_relative_error_below,
                            confident_features)


def make_case(spatial, channels=8, classes=2, pool_spatial=None, batch=1, pool_batch=1,
              dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool_spatial = pool_spatial or spatial
    feats = [torch.randn(b, channels, *sp, generator=g, dtype=torch.float64)
             for b, sp in ((batch, spatial), (batch, spatial), (pool_batch, pool_spatial))]
    logits = [torch.randn(b, classes, *sp, generator=g) * 2
              for b, sp in ((batch, spatial), (pool_batch, pool_spatial))]
    return [f.to(dtype) for f in feats], logits


def run(backend, feats, logits, *, dtype, grad_out=None, **kw):
    """Loss and the three input gradients for features cast to `dtype`."""
    leaves = [f.detach().to(dtype).requires_grad_() for f in feats]
    loss = rk.bidirectional_voxel_infonce(*leaves, *logits, backend=backend, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), [t.grad for t in leaves]


def check_against_reference(feats, logits, *, dtype=torch.float32, seed=None, grad_out=None,
                            factor=2.0, **kw):
    def call(backend, dt):
        extra = {}
        if kw.get("sampling") == "random":
            extra["generator"] = torch.Generator().manual_seed(seed or 0)
        return run(backend, feats, logits, dtype=dt, grad_out=grad_out, **kw, **extra)

    gt_loss, gt_grads = call("reference", torch.float64)
    ref_loss, ref_grads = call("reference", dtype)
    loss, grads = call("cpu", dtype)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    assert_close_to_reference(loss, ref_loss, gt_loss, dtype=dtype, factor=factor, name="loss")
    for name, g, r, gt in zip(("anchor", "positive", "negative"), grads, ref_grads, gt_grads):
        assert g.dtype == dtype and g.shape == gt.shape
        assert_close_to_reference(g, r, gt, dtype=dtype, factor=factor, name=f"grad {name}")
    return loss, grads


# --- values and gradients -------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize(
    "spatial,pool_spatial,classes,k",
    [
        ((5, 6, 4), None, 2, 16),       # 3-D, K below the eligible count
        ((7, 9), (5, 11), 3, 200),      # 2-D, pool of another size, K above it
        ((13,), (17,), 5, 4),           # 1-D, 5 classes
        ((3, 5, 7), (4, 4, 3), 4, 48),  # odd sizes
    ],
)
def test_matches_float64_reference(sampling, reduction, spatial, pool_spatial, classes, k):
    feats, logits = make_case(spatial, channels=12, classes=classes, pool_spatial=pool_spatial)
    check_against_reference(feats, logits, num_negatives=k, sampling=sampling,
                            reduction=reduction, seed=7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_half_precision_inputs_accumulate_in_fp32(dtype, sampling):
    feats, logits = make_case((6, 5, 4), channels=16, classes=3)
    check_against_reference(feats, logits, dtype=dtype, num_negatives=24, sampling=sampling)


@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_confident_anchors_keep_a_tiny_loss_accurate(sampling, reduction):
    # Per-anchor losses ~1e-3 under logits ~20: the kernel must not form them as lse - x.
    # The fp32 reference forms them that way itself, so the loss also gets a relative bound.
    _, logits = make_case((6, 5), classes=2, pool_spatial=(5, 4), seed=3)
    kw = dict(sampling=sampling, num_negatives=4, temperature=0.05, reduction=reduction)
    feats = confident_features()
    loss, _ = check_against_reference(feats, logits, seed=1, **kw)
    gen = torch.Generator().manual_seed(1) if sampling == "random" else None
    gt = rk.bidirectional_voxel_infonce(*feats, *logits, backend="reference", generator=gen, **kw)
    assert_relative_error_below(loss, gt, rtol=1e-5, name="loss")


def test_batches_on_both_sides():
    feats, logits = make_case((4, 5, 3), batch=2, pool_batch=3, classes=3)
    check_against_reference(feats, logits, num_negatives=30)


def test_grad_output_not_one():
    feats, logits = make_case((5, 4, 3), classes=3)
    check_against_reference(feats, logits, num_negatives=10, grad_out=torch.tensor(-3.7))
    weights = torch.linspace(-2, 3, 60).reshape(1, 5, 4, 3)
    check_against_reference(feats, logits, num_negatives=10, reduction="none", grad_out=weights)


def test_large_bank_uses_the_second_pass():
    # K * C * threads above the per-thread-copy budget (2^18 floats) takes the recompute pass.
    feats, logits = make_case((3, 3, 2), channels=64, pool_spatial=(24, 24, 12), classes=2)
    loss, _ = check_against_reference(feats, logits, num_negatives=3000)
    assert loss.ndim == 0


@pytest.mark.parametrize("layout", ["channels_last_3d", "transposed", "sliced"])
def test_non_contiguous_inputs(layout):
    feats, logits = make_case((6, 5, 4), channels=8, classes=3)
    if layout == "channels_last_3d":
        feats = [f.contiguous(memory_format=torch.channels_last_3d) for f in feats]
    elif layout == "transposed":
        feats = [f.transpose(2, 4).contiguous().transpose(2, 4) for f in feats]
    else:
        wide = [torch.cat([f, f.flip(1)], dim=1) for f in feats]
        feats = [w[:, ::2] for w in wide]
    assert not feats[0].is_contiguous()
    check_against_reference(feats, logits, num_negatives=20)


# --- edge cases --------------------------------------------------------------------------

def test_single_class_present_gives_zero_loss_and_gradients():
    feats, logits = make_case((4, 4, 3), classes=2)
    logits = [torch.stack([torch.ones_like(l[:, 0]), torch.zeros_like(l[:, 0])], 1) for l in logits]
    for sampling in ("topk", "random"):
        loss, grads = run("cpu", feats, logits, dtype=torch.float32, num_negatives=5,
                          sampling=sampling)
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads)
    check_against_reference(feats, logits, num_negatives=5)


def test_k_larger_than_pool_uses_only_eligible_voxels():
    feats, logits = make_case((3, 3, 2), classes=2, pool_spatial=(2, 2, 2))
    idx, counts = rk.select_confident_negatives(logits[1], 50)
    labels, _ = pseudo_labels(logits[1])
    for c in range(2):
        valid = idx[c, : counts[c]]
        assert (labels[valid] != c).all() and (idx[c, counts[c]:] == -1).all()
    assert counts.sum() == 8  # every pool voxel is eligible for exactly one of the 2 classes
    check_against_reference(feats, logits, num_negatives=50)


def test_zero_norm_features_are_finite_and_match():
    feats, logits = make_case((4, 3, 3), classes=3)
    for f in feats:
        f[..., 0, 0, :] = 0.0
    check_against_reference(feats, logits, num_negatives=12)
    check_against_reference(feats, logits, num_negatives=12, sampling="random")


def test_selection_matches_official_topk_on_distinct_confidences():
    """Brute force: the official pool x anchor mask + topk along the pool axis, per anchor."""
    _, logits = make_case((5, 4, 3), classes=3, seed=3)
    anchor_logits, negative_logits = logits
    k = 9
    idx, counts = rk.select_confident_negatives(negative_logits, k)
    a_labels, _ = pseudo_labels(anchor_logits)
    n_labels, conf = pseudo_labels(negative_logits)
    masked = (n_labels[:, None] != a_labels[None, :]).float() * conf[:, None]  # (M, N)
    official = torch.topk(masked, k, dim=0).indices  # (K, N)
    for anchor in range(a_labels.numel()):
        c = a_labels[anchor]
        assert counts[c] == k
        assert set(official[:, anchor].tolist()) == set(idx[c].tolist())


def test_inputs_without_grad_get_none_and_no_grad_runs_forward_only():
    feats, logits = make_case((4, 4, 3), classes=2)
    a, p = [f.clone().requires_grad_() for f in feats[:2]]
    n = feats[2].clone()
    loss = rk.bidirectional_voxel_infonce(a, p, n, *logits, num_negatives=8, backend="cpu")
    loss.backward()
    assert n.grad is None and a.grad is not None and p.grad is not None
    ref_a = feats[0].clone().requires_grad_()
    rk.bidirectional_voxel_infonce(ref_a, feats[1], feats[2], *logits, num_negatives=8,
                                   backend="reference").backward()
    torch.testing.assert_close(a.grad, ref_a.grad.float(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        nograd = rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=8, backend="cpu")
    assert not nograd.requires_grad
    torch.testing.assert_close(nograd, loss.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_deterministic_run_to_run(sampling):
    feats, logits = make_case((6, 6, 5), channels=16, classes=3)
    first = run("cpu", feats, logits, dtype=torch.float32, num_negatives=40, sampling=sampling,
                generator=torch.Generator().manual_seed(1))
    second = run("cpu", feats, logits, dtype=torch.float32, num_negatives=40, sampling=sampling,
                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(x, y) for x, y in zip(first[1], second[1]))


# --- random mode -------------------------------------------------------------------------

def test_philox_known_answer():
    # Philox4x32-10 with zero key and counter (Random123 test vector), first output word.
    assert philox_randint(0, np.array([0], dtype=np.uint64))[0] == 0x6627E8D5


def random_setup(threshold=0.0, seed=0):
    _, logits = make_case((6, 5, 4), classes=3, pool_spatial=(5, 5, 4), seed=seed)
    labels, _ = pseudo_labels(logits[0])
    idx, counts = eligible_negatives(logits[1], threshold, 3)
    return logits, labels, idx, counts


@pytest.mark.parametrize("offset", [0, 12345, 2**32 - 7])
def test_cpu_draws_equal_the_independent_numpy_philox(offset):
    _, labels, idx, counts = random_setup()
    for seed in (0, 1, 2**40 + 3, 2**62 - 1):
        kernel = ops.random_draws(labels, idx, counts, 17, seed, offset)
        reference = random_negative_draws_reference(labels, idx, counts, 17, seed, offset)
        assert torch.equal(kernel, reference)


def test_same_seed_same_draws_new_seed_new_draws():
    logits, _, _, _ = random_setup()
    a = rk.random_negative_draws(*logits, num_negatives=32, seed=5)
    b = rk.random_negative_draws(*logits, num_negatives=32, seed=5)
    c = rk.random_negative_draws(*logits, num_negatives=32, seed=6)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5


def test_random_loss_depends_on_the_generator_only():
    feats, logits = make_case((5, 5, 4), classes=3)
    kw = dict(num_negatives=8, sampling="random", backend="cpu")
    one = rk.bidirectional_voxel_infonce(*feats, *logits, generator=torch.Generator().manual_seed(4), **kw)
    two = rk.bidirectional_voxel_infonce(*feats, *logits, generator=torch.Generator().manual_seed(4), **kw)
    other = rk.bidirectional_voxel_infonce(*feats, *logits, generator=torch.Generator().manual_seed(9), **kw)
    assert one.item() == two.item() and one.item() != other.item()


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_every_draw_is_eligible(threshold):
    logits, labels, _, _ = random_setup(threshold)
    draws = rk.random_negative_draws(*logits, num_negatives=50, seed=3,
                                     confidence_threshold=threshold)
    n_labels, conf = pseudo_labels(logits[1])
    used = draws >= 0
    assert used.any()
    pool = draws.clamp(min=0)
    assert (n_labels[pool] != labels[:, None])[used].all()
    assert (conf[pool] >= threshold)[used].all()
    # Rows without a draw are exactly the anchors whose class has no eligible voxel.
    _, counts = eligible_negatives(logits[1], threshold, 3)
    assert torch.equal(~used.all(dim=1), counts[labels] == 0)


def test_draws_are_uniform_over_the_eligible_pool():
    logits, labels, idx, counts = random_setup(seed=11)
    draws = rk.random_negative_draws(*logits, num_negatives=4000, seed=2024)
    for c in range(3):
        rows = draws[labels == c]
        n = int(counts[c])
        if rows.numel() == 0 or n < 2:
            continue
        observed = torch.bincount(
            torch.searchsorted(idx[c, :n], rows.flatten()), minlength=n
        ).double()
        assert observed.sum() == rows.numel() and observed.numel() == n
        expected = rows.numel() / n
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        df = n - 1
        # Wilson-Hilferty: the 1e-6 upper quantile of chi-square(df) is about df*(1-2/(9df)+4.75*sqrt(2/(9df)))^3.
        bound = df * (1 - 2 / (9 * df) + 4.75 * math.sqrt(2 / (9 * df))) ** 3
        assert chi2 < bound, f"class {c}: chi2 {chi2:.1f} >= {bound:.1f} (df {df})"


# --- validation --------------------------------------------------------------------------

def _inputs():
    feats, logits = make_case((4, 4, 3), classes=2)
    return [*feats, *logits]


@pytest.mark.parametrize(
    "mutate,kwargs,match",
    [
        (lambda x: x.__setitem__(0, x[0].unsqueeze(-1)), {}, "anchor must be"),
        (lambda x: x.__setitem__(1, x[1][..., :2]), {}, "positive must have"),
        (lambda x: x.__setitem__(2, x[2][:, :4]), {}, "negative must be"),
        (lambda x: x.__setitem__(3, x[3][..., :2]), {}, "anchor_logits must be"),
        (lambda x: x.__setitem__(4, x[4][..., :2]), {}, "negative_logits must be"),
        (lambda x: x.__setitem__(4, torch.cat([x[4], x[4][:, :1]], 1)), {}, "same number of classes"),
        (lambda x: x.__setitem__(1, x[1].double()), {}, "share a dtype"),
        (lambda x: x.__setitem__(2, x[2].to("meta")), {}, "one device"),
        (lambda x: x[0].view(-1).__setitem__(3, float("nan")), {}, "anchor contains NaN"),
        (lambda x: x[4].view(-1).__setitem__(0, float("inf")), {}, "negative_logits contains NaN or Inf"),
        (lambda x: x.__setitem__(0, x[0].long()), {}, "floating"),
        (lambda x: None, {"num_negatives": 0}, "num_negatives"),
        (lambda x: None, {"temperature": 0.0}, "temperature"),
        (lambda x: None, {"sampling": "gumbel"}, "sampling"),
        (lambda x: None, {"reduction": "max"}, "reduction"),
        (lambda x: None, {"backend": "tpu"}, "backend"),
        (lambda x: None, {"confidence_threshold": 1.5}, "confidence_threshold"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(mutate, kwargs, match):
    x = _inputs()
    mutate(x)
    with pytest.raises(ValueError, match=match):
        rk.bidirectional_voxel_infonce(*x, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_pool_voxel_that_is_never_selected_is_not_reported(backend, bad):
    """The finite-input check passes the inputs' norms first; a non-finite one only fails the
    call if it reaches the loss, so a broken pool voxel outside every negative table is fine."""
    feats, logits = make_case((4, 4, 3), classes=2)
    feats = [f.float() for f in feats]
    idx, _ = rk.select_confident_negatives(logits[1], 3)
    unused = next(j for j in range(48) if j not in set(idx.flatten().tolist()))
    clean = rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=3, backend=backend)
    feats[2].view(8, -1)[:, unused] = bad
    broken = rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=3, backend=backend)
    torch.testing.assert_close(broken, clean, rtol=0, atol=0)
    feats[2].view(8, -1)[:, idx[0, 0]] = bad  # now a selected one: reported
    with pytest.raises(ValueError, match="negative contains NaN or Inf"):
        rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=3, backend=backend)


def test_cpu_backend_refuses_other_devices():
    x = [t.to("meta") for t in _inputs()]
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        rk.bidirectional_voxel_infonce(*x, backend="cpu")


# --- module, torch.library, torch.compile -----------------------------------------------

def test_module_matches_functional():
    feats, logits = make_case((4, 4, 3), classes=3)
    module = rk.BidirectionalVoxelContrastiveLoss(num_negatives=11, temperature=0.2, backend="cpu")
    expected = rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=11, temperature=0.2,
                                              backend="reference")
    torch.testing.assert_close(module(*feats, *logits), expected.float(), rtol=1e-5, atol=1e-6)
    assert "num_negatives=11" in repr(module)


def _op_args(sampling="topk"):
    feats, logits = make_case((4, 3, 3), classes=3)
    z = [f.float().reshape(1, 8, -1).requires_grad_() for f in feats]
    labels, _ = pseudo_labels(logits[0])
    if sampling == "topk":
        idx, counts = rk.select_confident_negatives(logits[1], 6)
    else:
        idx, counts = eligible_negatives(logits[1], 0.0, 3)
    return (*z, labels, idx, counts, 0.1, 6, sampling == "random", 77, 0, "cpu")


@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_opcheck(sampling):
    args = _op_args(sampling)
    torch.library.opcheck(ops.voxel_infonce_loss, args)
    torch.library.opcheck(ops.voxel_infonce_mean, (*args, True))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    feats, logits = make_case((4, 4, 3), classes=2)

    def loss_fn(a, p, n, la, ln):
        return rk.bidirectional_voxel_infonce(a, p, n, la, ln, num_negatives=7, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_leaves = [f.clone().requires_grad_() for f in feats]
    compiled_leaves = [f.clone().requires_grad_() for f in feats]
    eager = loss_fn(*eager_leaves, *logits)
    got = compiled(*compiled_leaves, *logits)
    eager.backward()
    got.backward()
    torch.testing.assert_close(got, eager)
    for x, y in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(x.grad, y.grad)


# --- fuzzing -----------------------------------------------------------------------------

# Derandomised so that CI sees the same 300 examples every run, over temperatures 1e-6..1e3 and
# feature scales 1e-30..1e30 (log-uniform); the @example cases are ones that earlier random
# runs found (a near-zero loss under 1/tau = 20; a dominating negative under 1/tau = 100, where
# the softmax normaliser must keep its digits).
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@example(dims=1, size=2, pool_size=4, channels=7, classes=2, k=1, sampling="topk",
         reduction="mean", temperature=0.05, scale=1.0, seed=1438)
@example(dims=1, size=2, pool_size=3, channels=2, classes=2, k=1, sampling="topk",
         reduction="mean", temperature=0.01, scale=1.0, seed=29794)
@given(
    dims=st.integers(1, 3),
    size=st.integers(1, 5),
    pool_size=st.integers(1, 5),
    channels=st.integers(1, 9),
    classes=st.integers(2, 5),
    k=st.integers(1, 40),
    sampling=st.sampled_from(["topk", "random"]),
    reduction=st.sampled_from(["mean", "none"]),
    temperature=st.floats(-6.0, 3.0).map(lambda exponent: 10.0**exponent),
    scale=st.floats(-30.0, 30.0).map(lambda exponent: 10.0**exponent),
    seed=st.integers(0, 2**31),
)
def test_fuzz_against_reference(dims, size, pool_size, channels, classes, k, sampling,
                                 reduction, temperature, scale, seed):
    spatial = tuple(size + d for d in range(dims))
    pool_spatial = tuple(pool_size + (d * 2) % 3 for d in range(dims))
    feats, logits = make_case(spatial, channels=channels, classes=classes,
                              pool_spatial=pool_spatial, seed=seed)
    check_against_reference([f * scale for f in feats], logits, num_negatives=k,
                            sampling=sampling, reduction=reduction, temperature=temperature,
                            seed=seed)


def test_mean_path_refuses_a_second_backward_through_the_graph():
    feats, logits = make_case((4, 4, 3), classes=2)
    leaves = [f.clone().requires_grad_() for f in feats]
    loss = rk.bidirectional_voxel_infonce(*leaves, *logits, num_negatives=6, backend="cpu")
    (2 * loss).backward(retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    reference = [f.clone().requires_grad_() for f in feats]
    (2 * rk.bidirectional_voxel_infonce(*reference, *logits, num_negatives=6,
                                        backend="reference")).backward()
    for got, want in zip(once, reference):
        torch.testing.assert_close(got, want.grad.float(), rtol=1e-4, atol=1e-6)


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    import warnings

    from rcps_kernels import _backend

    monkeypatch.setattr(_backend, "load_cpu_extension", lambda: "pretend the build failed")
    _backend._warn_fallback_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="pretend the build failed"):
        assert _backend.resolve_backend("auto", torch.device("cpu"), ("cpu", "reference")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_backend("auto", torch.device("cpu"), ("cpu", "reference")) == "reference"
    with pytest.raises(RuntimeError, match="not usable here"):
        _backend.resolve_backend("cpu", torch.device("cpu"), ("cpu", "reference"))
    _backend._warn_fallback_once.cache_clear()
