"""nn.Module wrappers of the functional API (MONAI-style losses)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import bidirectional_voxel_infonce


class BidirectionalVoxelContrastiveLoss(nn.Module):
    """RCPS's bidirectional voxel contrastive loss L_bc as a module.

    Args: see :func:`rcps_kernels.bidirectional_voxel_infonce`; every keyword is stored and used
    on each call. ``generator`` seeds random sampling; ``deterministic`` (None: follow
    ``torch.use_deterministic_algorithms`` at each call) forces random mode's deterministic
    GPU path on or off.

    Example::

        loss_fn = BidirectionalVoxelContrastiveLoss(num_negatives=400, temperature=0.1)
        loss = loss_fn(proj_aug1, proj_aug2, proj_other_orig, logits_orig, logits_other_orig)
    """

    def __init__(
        self,
        num_negatives: int = 400,
        temperature: float = 0.1,
        sampling: str = "topk",
        confidence_threshold: float = 0.0,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.sampling = sampling
        self.confidence_threshold = confidence_threshold
        self.generator = generator
        self.reduction = reduction
        self.backend = backend
        self.deterministic = deterministic

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor,
                anchor_logits: Tensor, negative_logits: Tensor) -> Tensor:
        return bidirectional_voxel_infonce(
            anchor, positive, negative, anchor_logits, negative_logits,
            num_negatives=self.num_negatives, temperature=self.temperature,
            sampling=self.sampling, confidence_threshold=self.confidence_threshold,
            generator=self.generator, reduction=self.reduction, backend=self.backend,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return (f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"sampling={self.sampling!r}, reduction={self.reduction!r}, backend={self.backend!r}")
