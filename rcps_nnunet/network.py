"""Where the projection head attaches to nnU-Net's U-Net, and the head itself.

nnU-Net's ``PlainConvUNet`` / ``ResidualEncoderUNet`` decode with ``decoder.stages``, deepest first; stage ``s`` of
``n - 1`` outputs the resolution of encoder stage ``n - 2 - s``. RCPS projects the decoder features at 1/4
resolution: the shallowest encoder level whose cumulative pooling reaches 4 along some axis. With anisotropic
plans (pooling ``[1, 2, 2]`` first) that level is 1/4 in-plane and full resolution across slices.
"""

from __future__ import annotations

import numpy as np
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

#: The projection head's resolution, as a pooling factor of the input.
PROJECTION_POOLING = 4


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers (what checkpoints store)."""
    if isinstance(module, DistributedDataParallel):
        module = module.module
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def projection_level(pool_op_kernel_sizes) -> int:
    """The encoder level (0 = full resolution) whose features the projection head takes.

    Args:
        pool_op_kernel_sizes: the plans' pooling per encoder stage (the first is all ones).

    Returns:
        The shallowest level with a cumulative pooling >= 4 along some axis, at most the deepest decoded level.
    """
    cumulative = np.cumprod(np.asarray(pool_op_kernel_sizes), axis=0)
    deepest_decoded = len(cumulative) - 2
    for level in range(1, deepest_decoded + 1):
        if cumulative[level].max() >= PROJECTION_POOLING:
            return level
    return deepest_decoded


def projection_stage(network: nn.Module, pool_op_kernel_sizes) -> tuple[nn.Module, int]:
    """The decoder stage to hook and its output channels.

    Args:
        network: nnU-Net's (unwrapped) network with ``encoder.output_channels`` and ``decoder.stages``.
        pool_op_kernel_sizes: the plans' pooling per encoder stage.

    Returns:
        ``(stage module, channels)``.
    """
    if not (hasattr(network, "decoder") and hasattr(network.decoder, "stages") and hasattr(network, "encoder")):
        raise ValueError(
            f"nnUNetTrainerRCPS attaches its projection head to decoder.stages of nnU-Net's U-Nets; "
            f"{type(network).__name__} has none"
        )
    level = projection_level(pool_op_kernel_sizes)
    stages = network.decoder.stages
    return stages[len(stages) - 1 - level], network.encoder.output_channels[level]


class ProjectionHead(nn.Module):
    """RCPS's voxel projection head: 1x1 conv, PReLU, 1x1 conv (the loss normalises the output).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the hooked decoder stage.
        project_dim: output channels.
    """

    def __init__(self, spatial_dims: int, in_channels: int, project_dim: int):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.layers = nn.Sequential(conv(in_channels, project_dim, 1), nn.PReLU(), conv(project_dim, project_dim, 1))

    def forward(self, features):
        return self.layers(features)
