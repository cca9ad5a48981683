"""ProjectorUNet: the residual 3D U-Net of RCPS with four deep-supervision heads and a projection head, and how a
run builds it (:func:`build_model`) and lays out its tensors (:func:`memory_format`).

Tensors are MONAI-style ``(B, C, D, H, W)``. With widths (16, 32, 64, 128, 256) the network has about
6.0 M parameters, like the authors' model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

HEAD_NAMES = ("level3", "level2", "level1", "out")


class ResBlock(nn.Module):
    """conv3(stride)-BN-PReLU, conv3-BN, plus a shortcut (1x1x1 conv + BN when the shape changes), then PReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm3d(out_channels)
        self.act1 = nn.PReLU()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(out_channels)
        self.shortcut = nn.Identity()
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )
        self.act2 = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))

    def forward_concat(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``forward(cat([first, second], 1))`` without materialising the concatenation: each convolution on
        the concatenation is the sum of convolutions on the parts with the matching weight slices. Backward then
        keeps the two parts (the first is the skip, stored anyway) instead of a third, wider tensor."""
        split = first.shape[1]

        def conv_on_concat(conv: nn.Conv3d) -> torch.Tensor:
            options = dict(stride=conv.stride, padding=conv.padding)
            return F.conv3d(first, conv.weight[:, :split], **options) + F.conv3d(
                second, conv.weight[:, split:], **options
            )

        y = self.act1(self.norm1(conv_on_concat(self.conv1)))
        y = self.norm2(self.conv2(y))
        conv, norm = self.shortcut  # decoder blocks always change the width, so the shortcut is conv + BN
        return self.act2(y + norm(conv_on_concat(conv)))


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module):
    """Stop BatchNorm running statistics from updating: the checkpoint recomputation must not count twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _decoder_stage(block: nn.Module, skip: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
    """Upsample ``deeper`` to the skip's size and apply the stage's ResBlock to ``[skip, up]``."""
    up = F.interpolate(deeper, size=skip.shape[2:], mode="trilinear", align_corners=False)
    return block.forward_concat(skip, up)


class ProjectorUNet(nn.Module):
    """Residual U-Net with deep supervision and a voxel projection head on the 1/4-resolution decoder stage.

    Args:
        in_channels: image channels.
        num_classes: segmentation classes, background included.
        widths: channels of the five encoder levels (strides 1, 2, 2, 2, 2).
        project_dim: channels of the projection head output.
        checkpointing: recompute every ResBlock in backward instead of storing its activations
            (trades roughly one extra forward for most of the activation memory).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        widths=(16, 32, 64, 128, 256),
        project_dim: int = 64,
        checkpointing: bool = False,
    ):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"model.widths must have 5 entries, got {list(widths)}")
        w0, w1, w2, w3, w4 = widths
        self.in_channels, self.checkpointing = in_channels, checkpointing
        self.encoder = nn.ModuleList(
            [
                ResBlock(in_channels, w0, 1),
                ResBlock(w0, w1, 2),
                ResBlock(w1, w2, 2),
                ResBlock(w2, w3, 2),
                ResBlock(w3, w4, 2),
            ]
        )
        # Decoder stages from deep to shallow: (skip width + deeper width) -> skip width.
        self.decoder = nn.ModuleList(
            [ResBlock(w3 + w4, w3), ResBlock(w2 + w3, w2), ResBlock(w1 + w2, w1), ResBlock(w0 + w1, w0)]
        )
        self.heads = nn.ModuleList([nn.Conv3d(w, num_classes, 1) for w in (w3, w2, w1, w0)])
        self.projector = nn.Sequential(
            nn.Conv3d(w2, project_dim, 1), nn.PReLU(), nn.Conv3d(project_dim, project_dim, 1)
        )

    def _run(self, block: nn.Module, function, *inputs: torch.Tensor) -> torch.Tensor:
        """``function(*inputs)``, recomputed in backward when checkpointing (only ``inputs`` are stored)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                function,
                *inputs,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _frozen_batchnorm_stats(block)),
            )
        return function(*inputs)

    def _decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = self._run(block, block, x)
            skips.append(x)
        x = skips.pop()
        stages = []
        for block in self.decoder:
            # The upsampling runs inside the checkpointed stage, so the low-resolution map is what gets stored.
            x = self._run(block, functools.partial(_decoder_stage, block), skips.pop(), x)
            stages.append(x)
        return stages  # resolutions 1/8, 1/4, 1/2, 1

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward.

        Args:
            x: images ``(B, C_in, D, H, W)``.

        Returns:
            ``level3, level2, level1, out``: logits ``(B, K, D, H, W)`` of the four heads, deepest first, each
            upsampled to the input size; ``project``: projections ``(B, project_dim, *S/4)``;
            ``project_map``: ``out`` resized to the projection grid ``(B, K, *S/4)``.
        """
        stages = self._decode(x)
        result = {}
        for name, head, stage in zip(HEAD_NAMES, self.heads, stages):
            logits = head(stage)
            if logits.shape[2:] != x.shape[2:]:
                logits = F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
            result[name] = logits
        quarter = stages[1]
        result["project"] = self.projector(quarter)
        result["project_map"] = F.interpolate(
            result["out"], size=quarter.shape[2:], mode="trilinear", align_corners=False
        )
        return result

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward: logits ``(B, K, D, H, W)`` of the final head only."""
        return self.heads[-1](self._decode(x)[-1])


def memory_format(config: dict) -> torch.memory_format:
    """The layout of the model and its inputs (``model.channels_last``).

    channels_last_3d cuts the peak memory of a CPU step at the LA patch, but small CPU configs run faster in the
    default NCDHW layout.

    Args:
        config: a resolved run config.

    Returns:
        ``torch.channels_last_3d`` or ``torch.contiguous_format``.
    """
    return torch.channels_last_3d if config["model"]["channels_last"] else torch.contiguous_format


def build_model(config: dict, in_channels: int, device: torch.device | str = "cpu") -> ProjectorUNet:
    """The network of ``config`` for images of ``in_channels`` channels, on ``device`` in the config's layout.

    Args:
        config: a resolved run config (``data.num_classes`` and the ``model`` section).
        in_channels: image channels.
        device: where the weights live.

    Returns:
        A freshly initialised ProjectorUNet (load a checkpoint's weights into it; they keep its layout).
    """
    model = ProjectorUNet(
        in_channels,
        config["data"]["num_classes"],
        config["model"]["widths"],
        config["model"]["project_dim"],
        config["model"]["checkpointing"],
    )
    return model.to(device, memory_format=memory_format(config))


def segmenter(model: ProjectorUNet, config: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.segment`` on inputs put into the config's layout first (what sliding-window inference calls).

    Args:
        model: a network built by :func:`build_model`.
        config: the config it was built from.

    Returns:
        ``(N, C_in, *window) -> (N, K, *window)`` logits.
    """
    layout = memory_format(config)
    return lambda x: model.segment(x.contiguous(memory_format=layout))


def build_parallel_model(
    config: dict, channels: int, device: torch.device, world_size: int
) -> tuple[torch.nn.Module, ProjectorUNet]:
    """The network of a training run and what its steps call.

    Args:
        config: a resolved run config.
        channels: image channels.
        device: this process's device.
        world_size: processes of the run.

    Returns:
        ``(model the steps call, raw model)``: the DDP wrapper and the network inside it in a distributed run
        (with SyncBatchNorm on CUDA), the network twice otherwise.
    """
    model = build_model(config, channels, device)
    if world_size == 1:
        return model, model
    if device.type == "cuda":  # SyncBatchNorm has no CPU implementation
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapper = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=config["train"]["method"] == "supervised",
    )
    return wrapper, model
