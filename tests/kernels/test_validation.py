"""Every input check of the public API, in one place; meta tensors, loss dtypes and the determinism switch.

Numerics live in test_infonce*.py / test_pseudo_supervision*.py; here: what a wrong argument gets (a TypeError
or ValueError naming it, before any work; non-finite inputs), what shape-only meta tensors get, and which path
(deterministic or not) the kernels are told to take, and when.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import pytest
import torch

import rcps_kernels as rk
from rcps_kernels import backends, determinism
from rcps_kernels.backends import kernel_table
from rcps_kernels.ops import infonce as infonce_ops
from tests.kernels.op_template import infonce_case, logits, needs_cpu


def infonce_inputs(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, 4, 3, 4, generator=g).to(device, dtype) for _ in range(3)]
    logits = [torch.randn(1, 2, 3, 4, generator=g).to(device) for _ in range(2)]
    return feats + logits


def infonce(*inputs, **kwargs):
    return rk.bidirectional_voxel_infonce(*(inputs or infonce_inputs()), **kwargs)


# --- argument types and values -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_negatives": True}, TypeError, "num_negatives must be an int, got bool"),
        ({"num_negatives": 2.5}, TypeError, "num_negatives must be an int, got float"),
        ({"num_negatives": 0}, ValueError, "num_negatives must be >= 1"),
        ({"temperature": True}, TypeError, "temperature must be a real number, got bool"),
        ({"temperature": "0.1"}, TypeError, "temperature must be a real number, got str"),
        ({"temperature": None}, TypeError, "temperature must be a real number, got NoneType"),
        ({"temperature": float("inf")}, ValueError, "temperature must be > 0 and finite"),
        ({"temperature": float("nan")}, ValueError, "temperature must be > 0 and finite"),
        ({"generator": 0}, TypeError, "generator must be a torch.Generator or None, got int"),
        ({"deterministic": 1}, TypeError, "deterministic must be True, False or None, got int"),
    ],
)
def test_infonce_arguments_of_the_wrong_type_or_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        infonce(sampling="random", **kwargs)


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: rk.BidirectionalVoxelContrastiveLoss(num_negatives=True), TypeError, "num_negatives must be an int"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(temperature=0.0), ValueError, "temperature"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(sampling="all"), ValueError, "sampling must be one of"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(confidence_threshold=2.0), ValueError, "confidence_threshold"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(generator=3), TypeError, "generator"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(reduction="max"), ValueError, "reduction"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(deterministic=1), TypeError, "deterministic"),
        (lambda: rk.BidirectionalVoxelContrastiveLoss(backend="tpu"), ValueError, "backend must be one of"),
        (lambda: rk.RectifiedPseudoSupervisionLoss(temperature=-1.0), ValueError, "temperature"),
        (lambda: rk.RectifiedPseudoSupervisionLoss(reduction="max"), ValueError, "reduction"),
        (lambda: rk.RectifiedPseudoSupervisionLoss(backend="tpu"), ValueError, "backend must be one of"),
        (lambda: rk.LogitCosineConsistencyLoss(eps="small"), TypeError, "eps"),
        (lambda: rk.LogitCosineConsistencyLoss(reduction="max"), ValueError, "reduction"),
        (lambda: rk.LogitCosineConsistencyLoss(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_modules_check_their_keywords_when_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "module,function",
    [
        (rk.BidirectionalVoxelContrastiveLoss, rk.bidirectional_voxel_infonce),
        (rk.RectifiedPseudoSupervisionLoss, rk.rectified_pseudo_supervision),
        (rk.LogitCosineConsistencyLoss, rk.logit_cosine_consistency),
    ],
)
def test_modules_take_the_functions_defaults(module, function):
    options = {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    built = module()
    assert options and {name: getattr(built, name) for name in options} == options


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: rk.select_confident_negatives(x, 2.5), TypeError, "num_negatives must be an int"),
        (lambda x: rk.select_confident_negatives(x, True), TypeError, "num_negatives must be an int"),
        (lambda x: rk.select_confident_negatives(x, 0), ValueError, "num_negatives must be >= 1"),
        (lambda x: rk.select_confident_negatives(x, 3, num_classes=True), TypeError, "num_classes"),
        (
            lambda x: rk.select_confident_negatives(x.reshape(1, 2, 1, 1, 3, 4, 1), 3),
            ValueError,
            r"pool_logits must be \(B, C, \*spatial\).*\(1, 2, 1, 1, 3, 4, 1\)",
        ),
        (
            lambda x: rk.select_confident_negatives(torch.full_like(x, float("nan")), 3),
            ValueError,
            r"pool_logits contains NaN or Inf \(shape \(1, 2, 3, 4\)\)",
        ),
        (lambda x: rk.select_confident_negatives(x.long(), 3), ValueError, "floating"),
    ],
)
def test_select_confident_negatives_refuses_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(infonce_inputs()[4])


# --- meta tensors: shapes only ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_infonce_on_meta_tensors_gives_the_shape(backend, reduction):
    inputs = [x.to("meta").requires_grad_(i < 3) for i, x in enumerate(infonce_inputs())]
    loss = infonce(*inputs, reduction=reduction, backend=backend)
    assert loss.device.type == "meta" and loss.dtype == torch.float32
    assert loss.shape == (() if reduction == "mean" else (1, 3, 4))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_pseudo_supervision_on_meta_tensors_gives_the_shape(backend):
    a, b, t = (torch.empty(2, 3, 4, 5, device="meta") for _ in range(3))
    results = (
        rk.rectified_pseudo_supervision(a, t, reduction="none", backend=backend),
        rk.logit_cosine_consistency(a, b, backend=backend),
        *rk.pseudo_supervision_losses(a, b, t, reduction="none", backend=backend),
    )
    for loss, shape in zip(results, ((2, 4, 5), (), (2, 4, 5), (2, 4, 5))):
        assert loss.device.type == "meta" and loss.shape == shape and loss.dtype == torch.float32


def test_select_confident_negatives_on_meta_tensors():
    idx, counts = rk.select_confident_negatives(torch.empty(1, 3, 4, 5, device="meta"), 6)
    assert idx.shape == (3, 6) and counts.shape == (3,)


# --- losses are float32 for half inputs, on every backend ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_losses_of_half_inputs_are_float32(dtype, backend):
    assert infonce(*infonce_inputs(dtype), backend=backend).dtype == torch.float32
    a, b, t = (torch.randn(1, 3, 4).to(dtype) for _ in range(3))
    for loss in (
        rk.rectified_pseudo_supervision(a, t, backend=backend),
        rk.logit_cosine_consistency(a, b, backend=backend),
        *rk.pseudo_supervision_losses(a, b, t, backend=backend),
    ):
        assert loss.dtype == torch.float32


# --- determinism: torch's switch at call time, or the keyword --------------------------------


@pytest.fixture
def torch_deterministic():
    """Turns torch.use_deterministic_algorithms on for the test, and off again after it."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_the_choice_follows_torchs_switch_when_called(torch_deterministic):
    assert determinism.deterministic_algorithms()
    torch.use_deterministic_algorithms(False)
    assert not determinism.deterministic_algorithms()


def test_an_override_wins_over_torchs_switch(torch_deterministic):
    with determinism.deterministic_override(False):
        assert not determinism.deterministic_algorithms()
        with determinism.deterministic_override(None):  # a nested call without the keyword
            assert determinism.deterministic_algorithms()
    torch.use_deterministic_algorithms(False)
    with determinism.deterministic_override(True):
        assert determinism.deterministic_algorithms()
    assert not determinism.deterministic_algorithms()


@pytest.fixture
def kernel_choices(monkeypatch):
    """The CPU kernel, recording what deterministic_algorithms() answers each time it runs."""
    seen: list[bool] = []
    table = kernel_table("cpu")

    def recording_kernel(*args, **kwargs):
        seen.append(determinism.deterministic_algorithms())
        return table.voxel_infonce(*args, **kwargs)

    recording_table = dataclasses.replace(table, voxel_infonce=recording_kernel)
    monkeypatch.setattr(infonce_ops, "kernel_table", lambda backend: recording_table)
    return seen


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "torch_switch,keyword,expected",
    [
        (False, None, False),
        (True, None, True),
        (True, False, False),
        (False, True, True),
    ],
)
def test_the_kernels_see_the_choice_in_forward_and_backward(kernel_choices, reduction, torch_switch, keyword, expected):
    inputs = [x.requires_grad_(i < 3) for i, x in enumerate(infonce_inputs())]
    torch.use_deterministic_algorithms(torch_switch)
    try:
        loss = infonce(*inputs, sampling="random", reduction=reduction, backend="cpu", deterministic=keyword)
        loss.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    # "mean" computes its gradients in forward (one kernel call); "none" calls it again in backward
    assert kernel_choices == [expected] * (1 if reduction == "mean" else 2)


def test_the_switch_is_read_when_backward_runs_not_at_forward(kernel_choices):
    inputs = [x.requires_grad_(i < 3) for i, x in enumerate(infonce_inputs())]
    loss = infonce(*inputs, sampling="random", reduction="sum", backend="cpu")
    torch.use_deterministic_algorithms(True)
    try:
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert kernel_choices == [False, True]


def test_the_module_passes_its_keyword(kernel_choices):
    loss_fn = rk.BidirectionalVoxelContrastiveLoss(sampling="random", deterministic=True, backend="cpu")
    loss_fn(*infonce_inputs())
    assert kernel_choices == [True]
    assert loss_fn.deterministic is True


def test_the_old_environment_switch_still_works_with_a_warning(monkeypatch):
    monkeypatch.setenv("RCPS_DETERMINISTIC", "1")
    determinism.warn_deprecated_environment_switch.cache_clear()
    with pytest.warns(FutureWarning, match="RCPS_DETERMINISTIC=1 is deprecated"):
        assert determinism.deterministic_algorithms()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert determinism.deterministic_algorithms()
    with determinism.deterministic_override(False):
        assert not determinism.deterministic_algorithms()
    monkeypatch.delenv("RCPS_DETERMINISTIC")
    assert not determinism.deterministic_algorithms()
    determinism.warn_deprecated_environment_switch.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_deterministic_keyword_makes_random_mode_bitwise_reproducible_on_a_gpu(backend):
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(1, 64, 16, 16, 8, generator=g).cuda() for _ in range(3)]
    logits = [torch.randn(1, 2, 16, 16, 8, generator=g).cuda() for _ in range(2)]

    def run():
        leaves = [f.clone().requires_grad_() for f in feats]
        loss = rk.bidirectional_voxel_infonce(
            *leaves,
            *logits,
            num_negatives=200,
            sampling="random",
            backend=backend,
            generator=torch.Generator().manual_seed(5),
            deterministic=True,
        )
        loss.backward()
        return [loss.detach(), *(t.grad for t in leaves)]

    first = run()
    for _ in range(3):
        for x, y in zip(first, run()):
            assert torch.equal(x, y)


# --- renamed keywords and settings ----------------------------------------------------------


def test_old_pool_keywords_warn_and_give_the_same_loss():
    anchor, positive, pool, anchor_logits, pool_logits = infonce_inputs()
    expected = rk.bidirectional_voxel_infonce(
        anchor, positive, pool=pool, anchor_logits=anchor_logits, pool_logits=pool_logits
    )
    with pytest.warns(DeprecationWarning, match="negative= is deprecated, use pool="):
        old = rk.bidirectional_voxel_infonce(
            anchor, positive, negative=pool, anchor_logits=anchor_logits, negative_logits=pool_logits
        )
    assert torch.equal(old, expected)
    module = rk.BidirectionalVoxelContrastiveLoss()
    with pytest.warns(DeprecationWarning, match="negative_logits= is deprecated"):
        assert torch.equal(module(anchor, positive, pool, anchor_logits, negative_logits=pool_logits), expected)
    with pytest.warns(DeprecationWarning, match="negative_logits= is deprecated"):
        idx, _ = rk.select_confident_negatives(negative_logits=pool_logits, num_negatives=3)
    assert torch.equal(idx, rk.select_confident_negatives(pool_logits, 3)[0])


def test_old_and_new_keyword_together_is_a_type_error():
    anchor, positive, pool, anchor_logits, pool_logits = infonce_inputs()
    with pytest.raises(TypeError, match="both negative= and its new name pool="):
        rk.bidirectional_voxel_infonce(
            anchor, positive, anchor_logits=anchor_logits, pool_logits=pool_logits, pool=pool, negative=pool
        )


def test_settings_are_read_at_call_time_and_checked(monkeypatch):
    from rcps_kernels import settings

    monkeypatch.setenv("RCPS_TRITON_DOT_PRECISION", "ieee")
    assert settings.triton_dot_precision() == "ieee"
    monkeypatch.setenv("RCPS_TRITON_DOT_PRECISION", "fp8")
    with pytest.raises(ValueError, match="RCPS_TRITON_DOT_PRECISION='fp8'"):
        settings.triton_dot_precision()
    monkeypatch.setenv("RCPS_GPU_BACKEND", "opencl")
    with pytest.raises(ValueError, match="RCPS_GPU_BACKEND='opencl'"):
        backends.resolve("auto", "cuda")


# --- second-order gradients ----------------------------------------------------------------


def _gradient_penalty(loss_of, inputs):
    """``sum(grad^2)`` of a loss with ``create_graph=True``, then its gradient (a gradient penalty)."""
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    (grad,) = torch.autograd.grad(loss_of(*inputs), inputs[0], create_graph=True)
    return torch.autograd.grad((grad**2).sum(), inputs[0])[0]


SECOND_ORDER = {
    "bidirectional_voxel_infonce": (
        lambda backend, reduction="mean": (
            lambda a, p, n: rk.bidirectional_voxel_infonce(
                a, p, n, *infonce_inputs(torch.float64)[3:], backend=backend, num_negatives=3, reduction=reduction
            )
        ),
        lambda: infonce_inputs(torch.float64)[:3],
    ),
    "rectified_pseudo_supervision": (
        lambda backend: lambda s, t: rk.rectified_pseudo_supervision(s, t, backend=backend),
        lambda: [torch.randn(1, 3, 4, 4, 2, dtype=torch.float64) for _ in range(2)],
    ),
    "logit_cosine_consistency": (
        lambda backend: lambda a, b: rk.logit_cosine_consistency(a, b, backend=backend),
        lambda: [torch.randn(1, 3, 4, 4, 2, dtype=torch.float64) for _ in range(2)],
    ),
    "pseudo_supervision_losses": (
        lambda backend: lambda a, b, t: sum(rk.pseudo_supervision_losses(a, b, t, backend=backend)),
        lambda: [torch.randn(1, 3, 4, 4, 2, dtype=torch.float64) for _ in range(3)],
    ),
}


@pytest.mark.parametrize("op", list(SECOND_ORDER))
def test_double_backward_raises_on_fused_backends_and_works_on_the_reference(op):
    make_loss, make_inputs = SECOND_ORDER[op]
    reference = _gradient_penalty(make_loss("reference"), make_inputs())
    assert reference.abs().sum() > 0  # the second-order term the fused backends would have dropped
    with pytest.raises(RuntimeError, match=rf"{op}: double backward \(create_graph=True\) .*backend='reference'"):
        _gradient_penalty(make_loss("cpu"), make_inputs())


def test_double_backward_raises_for_the_per_anchor_path_too():
    """``reduction="mean"`` computes its gradients in forward; "sum" recomputes them in backward: both refuse."""
    make_loss, make_inputs = SECOND_ORDER["bidirectional_voxel_infonce"]
    with pytest.raises(RuntimeError, match="double backward"):
        _gradient_penalty(make_loss("cpu", reduction="sum"), make_inputs())


# --- environment switches and the negative count ---------------------------------------------


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("RCPS_NO_JIT", "TRUE", True),
        ("RCPS_NO_JIT", "yes", True),
        ("RCPS_NO_JIT", "Off", False),
        ("RCPS_NO_JIT", "0", False),
        ("RCPS_DETERMINISTIC", "on", True),
        ("RCPS_DETERMINISTIC", "2", ValueError),
        ("RCPS_NO_JIT", "enabled", ValueError),
        ("TRITON_INTERPRET", "true", True),
        ("TRITON_INTERPRET", "yes", ValueError),  # Triton itself reads "yes" as off
        ("RCPS_BUILD_CUDA", "force", "1"),
        ("RCPS_BUILD_CUDA", "No", "0"),
        ("RCPS_BUILD_CUDA", "maybe", ValueError),
    ],
)
def test_switches_take_the_usual_spellings_and_refuse_others(monkeypatch, name, value, expected):
    from rcps_kernels import settings

    read = {
        "RCPS_NO_JIT": settings.jit_disabled,
        "RCPS_DETERMINISTIC": settings.deprecated_deterministic,
        "TRITON_INTERPRET": settings.triton_interpreting,
        "RCPS_BUILD_CUDA": settings.build_cuda,
    }[name]
    monkeypatch.setenv(name, value)
    if expected is ValueError:
        with pytest.raises(ValueError, match=rf"{name}='{value}': expected a switch"):
            read()
    else:
        assert read() == expected


def test_an_unknown_cpu_variant_is_an_error_not_a_fallback():
    import subprocess
    import sys

    code = (
        "import torch, rcps_kernels as rk\n"
        "x = [torch.randn(1, 4, 3, 4) for _ in range(3)] + [torch.randn(1, 2, 3, 4) for _ in range(2)]\n"
        "rk.bidirectional_voxel_infonce(*x)\n"
    )
    env = {**os.environ, "RCPS_CPU_VARIANT": "avx3"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ValueError: RCPS_CPU_VARIANT=avx3, but the built CPU variants are" in result.stderr


def test_topk_caps_the_negative_count_at_the_pool_before_any_table(monkeypatch):
    from rcps_kernels import functional

    seen, real = [], functional.negative_tables
    monkeypatch.setattr(functional, "negative_tables", lambda *a: seen.append(a[2]) or real(*a))
    inputs = [t.requires_grad_() if i < 3 else t for i, t in enumerate(infonce_inputs())]
    huge = rk.bidirectional_voxel_infonce(*inputs, num_negatives=10**6)
    (huge_grad,) = torch.autograd.grad(huge, inputs[0])
    exact = rk.bidirectional_voxel_infonce(*inputs, num_negatives=12)  # the pool holds 3 x 4 voxels
    assert seen == [12, 12]
    torch.testing.assert_close(huge, exact, rtol=0, atol=0)
    torch.testing.assert_close(huge_grad, torch.autograd.grad(exact, inputs[0])[0], rtol=0, atol=0)


def test_the_old_spelling_of_the_reference_normalise_warns_and_agrees():
    from rcps_kernels.reference import infonce as reference

    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    with pytest.warns(DeprecationWarning, match="normalize is deprecated, use normalise"):
        old = reference.normalize(rows)
    assert torch.equal(old, reference.normalise(rows))
    assert torch.equal(old[0], torch.tensor([0.6, 0.8]))


# --- bidirectional_voxel_infonce ----------------------------------------------------------------
def _infonce_case_inputs():
    feats, logits = infonce_case((4, 4, 3), classes=2)
    return [*feats, *logits]


@pytest.mark.parametrize(
    "mutate,kwargs,match",
    [
        (lambda x: x.__setitem__(0, x[0].unsqueeze(-1)), {}, "anchor must be"),
        (lambda x: x.__setitem__(1, x[1][..., :2]), {}, "positive must have"),
        (lambda x: x.__setitem__(2, x[2][:, :4]), {}, "pool must be"),
        (lambda x: x.__setitem__(3, x[3][..., :2]), {}, "anchor_logits must be"),
        (lambda x: x.__setitem__(4, x[4][..., :2]), {}, "pool_logits must be"),
        (lambda x: x.__setitem__(4, torch.cat([x[4], x[4][:, :1]], 1)), {}, "same number of classes"),
        (lambda x: x.__setitem__(1, x[1].double()), {}, "share a dtype"),
        (lambda x: x.__setitem__(2, x[2].to("meta")), {}, "one device"),
        (lambda x: x[0].view(-1).__setitem__(3, float("nan")), {}, "anchor contains NaN"),
        (lambda x: x[4].view(-1).__setitem__(0, float("inf")), {}, "pool_logits contains NaN or Inf"),
        (lambda x: x.__setitem__(0, x[0].long()), {}, "floating"),
        (lambda x: None, {"num_negatives": 0}, "num_negatives"),
        (lambda x: None, {"temperature": 0.0}, "temperature"),
        (lambda x: None, {"sampling": "gumbel"}, "sampling"),
        (lambda x: None, {"reduction": "max"}, "reduction"),
        (lambda x: None, {"backend": "tpu"}, "backend"),
        (lambda x: None, {"confidence_threshold": 1.5}, "confidence_threshold"),
    ],
)
def test_infonce_bad_inputs_raise_value_errors_naming_the_argument(mutate, kwargs, match):
    x = _infonce_case_inputs()
    mutate(x)
    with pytest.raises(ValueError, match=match):
        rk.bidirectional_voxel_infonce(*x, **kwargs)


def test_cpu_backend_refuses_other_devices():
    x = [t.to("meta") for t in _infonce_case_inputs()]
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        rk.bidirectional_voxel_infonce(*x, backend="cpu")


# --- rectified_pseudo_supervision, logit_cosine_consistency ---------------------------------------
X = torch.zeros(2, 3, 4, 4)


def _urp(student, teacher, **kw):
    return rk.rectified_pseudo_supervision(student, teacher, **kw)


def _cr(a, b, **kw):
    return rk.logit_cosine_consistency(a, b, **kw)


BAD_CALLS = [
    ("shape", lambda: _urp(X, torch.zeros(2, 3, 4, 5)), r"teacher_logits.*\(2, 3, 4, 5\)"),
    ("one class", lambda: _urp(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)), r"student_logits.*\(2, 1, 4\)"),
    ("rank 2", lambda: _cr(torch.zeros(2, 3), torch.zeros(2, 3)), r"logits_a.*\(2, 3\)"),
    ("rank 6", lambda: _cr(torch.zeros(1, 2, 1, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1, 1)), "logits_a"),
    ("integer", lambda: _urp(X.long(), X.long()), r"student_logits.*int64"),
    ("dtype mix", lambda: _cr(X, X.double()), r"logits_a and logits_b.*dtype"),
    ("device", lambda: _urp(X, X.to("meta")), r"teacher_logits.*meta"),
    ("temperature 0", lambda: _urp(X, X, temperature=0.0), "temperature"),
    ("temperature < 0", lambda: _urp(X, X, temperature=-1.0), "temperature"),
    ("temperature inf", lambda: _urp(X, X, temperature=float("inf")), "temperature.*finite"),
    ("temperature nan", lambda: _urp(X, X, temperature=float("nan")), "temperature.*finite"),
    # 1/T overflows float32 (it would make the sharpened target NaN); float64 takes it
    ("temperature 1e-45", lambda: _urp(X, X, temperature=1e-45), r"temperature=1e-45.*1/temperature"),
    ("temperature 1e39", lambda: _urp(X, X, temperature=1e39), r"temperature.*out of range"),
    ("eps 1e-45", lambda: _cr(X, X, eps=1e-45), r"eps=1e-45.*out of range"),
    ("eps 0", lambda: _cr(X, X, eps=0.0), "eps"),
    ("reduction", lambda: _cr(X, X, reduction="avg"), "reduction"),
    ("module temperature", lambda: rk.RectifiedPseudoSupervisionLoss(temperature=0), "temperature"),
    ("module eps", lambda: rk.LogitCosineConsistencyLoss(eps=-1e-8), "eps"),
]


@pytest.mark.parametrize("call,pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_invalid_arguments_raise(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


BAD_TYPES = [
    ("temperature bool", lambda: _urp(X, X, temperature=True), "temperature must be a real number"),
    ("temperature str", lambda: _urp(X, X, temperature="0.5"), "temperature must be a real number"),
    ("temperature None", lambda: _urp(X, X, temperature=None), "temperature must be a real number"),
    ("eps None", lambda: _cr(X, X, eps=None), "eps must be a real number"),
    (
        "module temperature str",
        lambda: rk.RectifiedPseudoSupervisionLoss(temperature="hot"),
        "temperature must be a real number",
    ),
    (
        "head temperature bool",
        lambda: rk.pseudo_supervision_losses(X, X, X, temperature=True),
        "temperature must be a real",
    ),
]


@pytest.mark.parametrize("call,pattern", [c[1:] for c in BAD_TYPES], ids=[c[0] for c in BAD_TYPES])
def test_wrong_argument_types_raise_type_errors(call, pattern):
    with pytest.raises(TypeError, match=pattern):
        call()


def _with(value, index):
    x = torch.randn(2, 3, 4)
    x[index] = value
    return x


NON_FINITE = [
    ("student nan", lambda b: _urp(_with(float("nan"), (0, 1, 2)), torch.randn(2, 3, 4), backend=b), "student_logits"),
    (
        "student -inf",
        lambda b: _urp(_with(float("-inf"), (0, 1, 2)), torch.randn(2, 3, 4), backend=b),
        "student_logits",
    ),
    ("teacher +inf", lambda b: _urp(torch.randn(2, 3, 4), _with(float("inf"), (1, 0, 0)), backend=b), "teacher_logits"),
    ("teacher nan", lambda b: _urp(torch.randn(2, 3, 4), _with(float("nan"), (1, 0, 0)), backend=b), "teacher_logits"),
    (
        "teacher all -inf",
        lambda b: _urp(torch.randn(2, 3, 4), _with(float("-inf"), (1, slice(None), 3)), backend=b),
        "all -inf",
    ),
    ("cosine b inf", lambda b: _cr(torch.randn(2, 3, 4), _with(float("inf"), (0, 0, 0)), backend=b), "logits_b"),
    ("cosine a nan", lambda b: _cr(_with(float("nan"), (0, 2, 1)), torch.randn(2, 3, 4), backend=b), "logits_a"),
]


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "reference"])
@pytest.mark.parametrize("call,pattern", [c[1:] for c in NON_FINITE], ids=[c[0] for c in NON_FINITE])
def test_non_finite_inputs_raise(backend, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(backend)


# --- pseudo_supervision_losses ---------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate,kwargs,match",
    [
        (lambda a, b, t: (a, b[:, :, :-1], t), {}, "view_a and view_b must have the same shape"),
        (lambda a, b, t: (a, b, t[:, :2]), {}, "view_a and teacher_logits must have the same shape"),
        (lambda a, b, t: (a[:, :1], b[:, :1], t[:, :1]), {}, "view_a needs at least 2 classes"),
        (lambda a, b, t: (a, b, t), {"temperature": 0.0}, "temperature must be > 0"),
        (lambda a, b, t: (a, b, t), {"eps": -1.0}, "eps must be > 0"),
        (lambda a, b, t: (a, b.index_fill(1, torch.tensor([0]), float("nan")), t), {}, "view_b contains NaN"),
    ],
)
def test_pseudo_supervision_losses_bad_inputs_raise_value_errors_naming_the_argument(mutate, kwargs, match):
    shape = (1, 3, 4, 4)
    inputs = mutate(*(logits(shape, seed=s).float() for s in (53, 54, 55)))
    with pytest.raises(ValueError, match=match):
        rk.pseudo_supervision_losses(*inputs, backend="reference" if "NaN" in match else "auto", **kwargs)
