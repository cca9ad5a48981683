"""nn.Module forms of the public functions (MONAI-style losses): each stores its keywords and
calls the function in :mod:`rcps_kernels.functional`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validation as v
from .functional import bidirectional_voxel_infonce, logit_cosine_consistency, rectified_pseudo_supervision


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

    @v.renamed_keywords(negative="pool", negative_logits="pool_logits")
    def forward(
        self, anchor: Tensor, positive: Tensor, pool: Tensor, anchor_logits: Tensor, pool_logits: Tensor
    ) -> Tensor:
        """The loss; ``pool``/``pool_logits`` were called ``negative``/``negative_logits``
        (deprecated keywords, still accepted for one release)."""
        return bidirectional_voxel_infonce(
            anchor,
            positive,
            pool,
            anchor_logits,
            pool_logits,
            num_negatives=self.num_negatives,
            temperature=self.temperature,
            sampling=self.sampling,
            confidence_threshold=self.confidence_threshold,
            generator=self.generator,
            reduction=self.reduction,
            backend=self.backend,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"sampling={self.sampling!r}, reduction={self.reduction!r}, backend={self.backend!r}"
        )


class RectifiedPseudoSupervisionLoss(nn.Module):
    """Module form of :func:`rectified_pseudo_supervision`.

    Args:
        temperature: sharpening temperature T > 0.
        reduction: "mean", "sum" or "none".
        backend: "auto", "cpu", "triton", "cuda", "torch" or "reference".

    Raises:
        TypeError: temperature is not a real number.
        ValueError: temperature not finite or <= 0, or an unknown reduction.
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        v.check_loss_options(reduction, temperature=temperature)
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return rectified_pseudo_supervision(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
        )


class LogitCosineConsistencyLoss(nn.Module):
    """Module form of :func:`logit_cosine_consistency`.

    Args:
        eps: smallest norm, > 0.
        reduction: "mean", "sum" or "none".
        backend: "auto", "cpu", "triton", "cuda", "torch" or "reference".

    Raises:
        TypeError: eps is not a real number.
        ValueError: eps not finite or <= 0, or an unknown reduction.
    """

    def __init__(self, eps: float = 1e-8, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        v.check_loss_options(reduction, eps=eps)
        self.eps = eps
        self.reduction = reduction
        self.backend = backend

    def forward(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        return logit_cosine_consistency(
            logits_a, logits_b, eps=self.eps, reduction=self.reduction, backend=self.backend
        )
