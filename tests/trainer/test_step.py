"""One training step per backend, its loss terms against the reference backend, schedule and ramp values,
block checkpointing, and the model's shapes."""

import math

import pytest
import torch

from rcps_train.config import load_config
from rcps_train.losses import TERMS, learning_rate, ramp_weight, rcps_loss_terms
from rcps_train.model import ProjectorUNet
from rcps_train.step import StepContext, train_step

PATCH = (32, 32, 24)


def tiny_config(**overrides):
    values = {
        "model.widths": "[4, 8, 8, 16, 16]",
        "model.project_dim": 16,
        "loss.num_negatives": 32,
        "data.patch_size": f"{list(PATCH)}",
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, 1, *PATCH, dtype=torch.long)
    label[..., 8:20, 10:24, 6:18] = 1
    image_l = torch.randn(1, 1, *PATCH, generator=g) + 2.0 * label
    return {"image_l": image_l, "label_l": label, "image_u": torch.randn(1, 1, *PATCH, generator=g)}


def make_model(config, seed=0):
    torch.manual_seed(seed)
    c = config
    return ProjectorUNet(1, 2, c["model"]["widths"], c["model"]["project_dim"], c["model"]["checkpointing"])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_one_step_per_backend(backend):
    config = tiny_config(**{"loss.backend": f'"{backend}"'})
    model = make_model(config)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    context = StepContext(model, optimizer, scaler, config, augment_generator=torch.Generator().manual_seed(1))
    values = train_step(context, tiny_batch(), ramp=0.5)
    assert set(TERMS) <= set(values) and all(math.isfinite(values[k]) for k in ("loss", *TERMS))
    assert all(values[k] > 0 for k in TERMS)
    # Random projections: L_bc starts near 2 ln(K + 1), i.e. every term is really computed.
    assert 0.5 * 2 * math.log(33) < values["bc_l"] < 2 * 2 * math.log(33)
    expected = values["seg"] + 0.5 * (
        0.1 * (values["bc_l"] + values["bc_u"]) + 0.1 * sum(values[k] for k in ("urp_l", "urp_u", "cr_l", "cr_u"))
    )
    assert values["loss"] == pytest.approx(expected, rel=1e-5)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed), "every parameter, the projector included, must receive a gradient"


def test_supervised_step_trains_seg_only():
    config = tiny_config(**{"train.method": '"supervised"'})
    model = make_model(config)
    projector_before = [p.detach().clone() for p in model.projector.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    context = StepContext(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), config)
    values = train_step(context, tiny_batch(), 1.0)
    assert math.isfinite(values["seg"]) and values["loss"] == values["seg"]
    assert all(math.isnan(values[k]) for k in TERMS if k != "seg")
    assert all(torch.equal(b, p) for b, p in zip(projector_before, model.projector.parameters()))


def _terms_and_grads(config, outputs_source):
    outputs = {k: v.detach().clone().requires_grad_(True) for k, v in outputs_source.items()}
    label = tiny_batch()["label_l"]
    terms = rcps_loss_terms(outputs, label, 1, config["loss"], torch.tensor(config["loss"]["class_weights"]))
    sum(terms.values()).backward()
    return {k: v.detach() for k, v in terms.items()}, {k: v.grad for k, v in outputs.items()}


@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_step_terms_match_reference_backend(sampling):
    config = tiny_config(**{"loss.sampling": f'"{sampling}"'})
    model = make_model(config)
    batch = tiny_batch()
    x = torch.cat(
        [
            batch["image_l"],
            1.2 * batch["image_l"],
            0.8 * batch["image_l"] + 0.1,
            batch["image_u"],
            1.3 * batch["image_u"],
            0.7 * batch["image_u"],
        ]
    )
    outputs = {k: v.detach() for k, v in model(x).items()}
    results = {}
    for backend in ("auto", "reference"):
        cfg = {**config, "loss": {**config["loss"], "backend": backend}}
        if sampling == "random":
            cfg["loss"]["confidence_threshold"] = 0.0
        results[backend] = _terms_and_grads(cfg, outputs)
    (terms_fused, grads_fused), (terms_ref, grads_ref) = results["auto"], results["reference"]
    if sampling == "random":  # same generator state is not passed: compare the deterministic terms only
        names = [k for k in TERMS if not k.startswith("bc")]
    else:
        names = list(TERMS)
    for name in names:
        torch.testing.assert_close(terms_fused[name], terms_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    if sampling == "topk":
        for name in grads_ref:
            if grads_ref[name] is not None:
                torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_schedule_values_match_the_official_run():
    lr = [learning_rate(e, 100) for e in range(100)]
    assert lr[0] == pytest.approx(1e-4)
    assert lr[3] == pytest.approx(0.00604) and lr[4] == pytest.approx(0.00802)
    assert lr[5] == pytest.approx(0.01)
    assert lr[50] == pytest.approx(0.01 * (1 - 45 / 95) ** 0.9) and lr[50] == pytest.approx(0.0056, abs=1e-4)
    assert lr[99] == pytest.approx(1.7e-4, rel=0.05)
    assert learning_rate(199, 200) == pytest.approx(9e-5, rel=0.1)


def test_ramp_values():
    assert ramp_weight(0, 100) == pytest.approx(math.exp(-5), rel=1e-9)
    assert ramp_weight(25, 100) == pytest.approx(0.0600, abs=5e-4)
    assert ramp_weight(50, 100) == pytest.approx(0.2865, abs=5e-4)
    assert ramp_weight(75, 100) == pytest.approx(0.7316, abs=5e-4)
    assert ramp_weight(100, 100) == 1.0 and ramp_weight(150, 100) == 1.0


def test_block_checkpointing_gives_same_gradients_and_counts_bn_stats_once():
    torch.manual_seed(0)
    plain = ProjectorUNet(1, 2, (4, 8, 8, 16, 16), 16)
    checkpointed = ProjectorUNet(1, 2, (4, 8, 8, 16, 16), 16, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    grads = []
    for model in (plain, checkpointed):
        out = model(x)
        (out["out"].square().mean() + out["project"].mean() + out["level3"].mean()).backward()
        grads.append([p.grad for p in model.parameters()])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-4, atol=1e-6)
    for b_plain, b_ckpt in zip(plain.buffers(), checkpointed.buffers()):
        torch.testing.assert_close(b_ckpt, b_plain)  # running stats updated once, not twice
    assert not torch.equal(plain.encoder[0].norm1.running_mean, torch.zeros(4))


def test_model_shapes_and_parameter_count():
    model = ProjectorUNet()
    assert sum(p.numel() for p in model.parameters()) == 6_004_603  # the authors' count
    out = ProjectorUNet(1, 3, (4, 8, 8, 16, 16), 16)(torch.randn(2, 1, 32, 32, 24))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "level3": (2, 3, 32, 32, 24),
        "level2": (2, 3, 32, 32, 24),
        "level1": (2, 3, 32, 32, 24),
        "out": (2, 3, 32, 32, 24),
        "project": (2, 16, 8, 8, 6),
        "project_map": (2, 3, 8, 8, 6),
    }


def test_channels_last_layout_gives_the_same_step():
    results = []
    for channels_last in ("false", "true"):
        config = tiny_config(**{"model.channels_last": channels_last})
        model = make_model(config)
        if channels_last == "true":
            model = model.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        context = StepContext(model, optimizer, scaler, config, augment_generator=torch.Generator().manual_seed(3))
        values = train_step(context, tiny_batch(), 0.5)
        results.append((values, [p.detach().clone() for p in model.parameters()]))
    (values_a, params_a), (values_b, params_b) = results
    for name in ("loss", *TERMS):
        assert values_b[name] == pytest.approx(values_a[name], rel=1e-4, abs=1e-6), name
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_decoder_block_without_concatenation_matches_concatenation():
    from rcps_train.model import ResBlock

    torch.manual_seed(0)
    block = ResBlock(6 + 10, 6)
    skip, up = torch.randn(2, 6, 8, 8, 6), torch.randn(2, 10, 8, 8, 6)
    torch.testing.assert_close(block.forward_concat(skip, up), block(torch.cat([skip, up], 1)), rtol=1e-5, atol=1e-5)
