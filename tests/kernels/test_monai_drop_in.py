"""MONAI MetaTensor inputs: the losses take them eagerly and under torch.compile(fullgraph=True), return plain
tensors equal to those of plain inputs, and the MONAI example runs."""

import importlib.util

import pytest
import torch

import rcps_kernels as rk
from tests.paths import REPO_ROOT

monai_data = pytest.importorskip("monai.data")
EXAMPLE = REPO_ROOT / "examples" / "monai_drop_in.py"


def _meta(shape, seed, spacing, requires_grad=False):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    affine = torch.diag(torch.tensor([*spacing, 1.0]))
    return monai_data.MetaTensor(values, affine=affine, meta={"filename_or_obj": f"case_{seed}"}).requires_grad_(
        requires_grad
    )


def _calls(backend):
    """(name, function, input shapes) of every public loss; the first input receives gradient."""
    logits, features = (2, 2, 4, 4, 3), (2, 8, 4, 4, 3)
    return [
        (
            "infonce",
            lambda a, p, n, la, ln: rk.bidirectional_voxel_infonce(a, p, n, la, ln, num_negatives=8, backend=backend),
            [features] * 3 + [logits] * 2,
        ),
        (
            "pseudo_supervision_losses",
            lambda a, b, t: rk.pseudo_supervision_losses(a, b, t, backend=backend),
            [logits] * 3,
        ),
        (
            "rectified_pseudo_supervision",
            lambda s, t: rk.rectified_pseudo_supervision(s, t, reduction="none", backend=backend),
            [logits] * 2,
        ),
        ("logit_cosine_consistency", lambda a, b: rk.logit_cosine_consistency(a, b, backend=backend), [logits] * 2),
    ]


def _run(function, inputs):
    out = function(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.sum() for o in outs).backward()
    return outs, inputs[0].grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("compiled", [False, True])
def test_metatensor_inputs_give_plain_results_equal_to_plain_inputs(backend, compiled):
    for name, eager, shapes in _calls(backend):
        torch._dynamo.reset()
        function = torch.compile(eager, fullgraph=True) if compiled else eager
        # Two calls with different metadata (spacing, file name): the second must not recompile.
        with torch._dynamo.config.patch(error_on_recompile=True):
            for call, spacing in enumerate([(0.8, 0.8, 2.5), (1.0, 0.7, 3.0)]):
                metas = [_meta(s, 10 * call + i, spacing, requires_grad=i == 0) for i, s in enumerate(shapes)]
                outs, grad = _run(function, metas)
                plain = [m.as_tensor().detach().requires_grad_(i == 0) for i, m in enumerate(metas)]
                expected, expected_grad = _run(eager, plain)
                for out, ref in zip(outs, expected):
                    assert type(out) is torch.Tensor, (name, type(out))
                    torch.testing.assert_close(out, ref, msg=name)
                assert type(grad) is torch.Tensor and metas[0].grad is grad
                torch.testing.assert_close(grad, expected_grad, msg=name)


def test_monai_example_trains(capsys):
    spec = importlib.util.spec_from_file_location("monai_drop_in", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(["--steps", "3", "--size", "16", "--backend", "cpu"])
    assert "L_bc is a Tensor" in capsys.readouterr().out
    for terms in history:
        assert set(terms) == {"loss", "seg", "urp_l", "cr_l", "bc_l", "urp_u", "cr_u", "bc_u"}
        assert all(torch.isfinite(value) for value in terms.values())
        assert all(type(terms[key]) is torch.Tensor for key in ("urp_l", "cr_l", "bc_l", "urp_u", "cr_u", "bc_u"))
    assert history[-1]["loss"] < history[0]["loss"]  # it trains
