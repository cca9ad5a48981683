"""One optimisation step of a run (docs/design.md section 1.1): views, one forward over 6 volumes, all losses, update.

:class:`StepContext` holds what stays the same from step to step (network, optimizer, scaler, settings, random
streams); :func:`train_step` takes it, a batch and the epoch's ramp weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .augment import intensity_view
from .losses import TERMS, rcps_loss_terms, segmentation_loss, total_loss
from .model import memory_format


@dataclass
class StepContext:
    """What every training step of a run uses besides its batch and ramp weight.

    Attributes:
        model: ProjectorUNet (or its DDP wrapper), in train mode.
        optimizer: the run's SGD.
        scaler: a ``torch.amp.GradScaler`` (disabled unless fp16).
        config: the run config (``train.method``, the ``loss`` section, ``model.channels_last``).
        device: where the step runs.
        amp_dtype: autocast dtype, or None for full precision.
        augment_generator: CPU generator of the intensity views.
        negative_generator: generator for ``loss.sampling = "random"``.
        gather_negatives: cross-rank negative pooling (DDP), or None.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None
    augment_generator: torch.Generator = field(default_factory=torch.Generator)
    negative_generator: torch.Generator | None = None
    gather_negatives: Callable | None = None


def _forward(context: StepContext, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward over the labeled patch (with, for RCPS, its two views and the unlabeled patch with
    its two), under autocast.

    Args:
        context: the run's step context.
        batch: ``image_l``, ``label_l``, ``image_u`` tensors ``(B, C, *patch)``.

    Returns:
        The float32 outputs, the labeled image and its label, on the context's device.
    """
    device, amp_dtype = context.device, context.amp_dtype
    x_l, y_l = batch["image_l"].to(device, non_blocking=True), batch["label_l"].to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        if context.config["train"]["method"] == "rcps":
            x_u = batch["image_u"].to(device, non_blocking=True)
            views = [intensity_view(x, context.augment_generator) for x in (x_l, x_l, x_u, x_u)]
            inputs = torch.cat([x_l, views[0], views[1], x_u, views[2], views[3]])
        else:
            inputs = x_l
        outputs = context.model(inputs.contiguous(memory_format=memory_format(context.config)))
    # The losses run in float32 whatever the forward precision (the kernels accumulate in fp32 anyway).
    return {name: value.float() for name, value in outputs.items()}, x_l, y_l


def train_step(context: StepContext, batch: dict, ramp: float) -> dict[str, float]:
    """One optimisation step: views, one forward, every loss term, one update of ``context.model``.

    Args:
        context: the run's step context.
        batch: ``image_l``, ``label_l``, ``image_u`` tensors ``(B, C, *patch)``.
        ramp: the ramp-up weight of this epoch.

    Returns:
        Floats: ``loss`` and every term (nan for terms the method does not use).

    Raises:
        FloatingPointError: the loss is not finite (before any weight changes).
    """
    loss_cfg = context.config["loss"]
    outputs, x_l, y_l = _forward(context, batch)
    class_weights = torch.tensor(loss_cfg["class_weights"], device=context.device)
    if context.config["train"]["method"] == "rcps":
        terms = rcps_loss_terms(
            outputs,
            y_l,
            x_l.shape[0],
            loss_cfg,
            class_weights,
            context.gather_negatives,
            context.negative_generator,
        )
    else:
        terms = {"seg": segmentation_loss(outputs, y_l, class_weights, loss_cfg["ce_lambda"])}
    loss = total_loss(terms, ramp, loss_cfg)
    loss_value = loss.detach()
    if not torch.isfinite(loss_value):
        raise FloatingPointError(
            f"non-finite loss {loss_value.item()} (terms: "
            + ", ".join(f"{k}={v.detach().item():.4g}" for k, v in terms.items())
            + ")"
        )
    context.optimizer.zero_grad(set_to_none=True)
    context.scaler.scale(loss).backward()
    context.scaler.step(context.optimizer)
    context.scaler.update()
    # One device-to-host copy for all the logged numbers (each .item() would sync on its own).
    present = [name for name in TERMS if name in terms]
    numbers = torch.stack([loss_value.float(), *(terms[n].detach().float() for n in present)]).tolist()
    values = dict.fromkeys(TERMS, float("nan"))
    values.update(zip(present, numbers[1:]))
    return {"loss": numbers[0], **values}
