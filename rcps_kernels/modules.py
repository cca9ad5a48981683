"""nn.Module forms of the public functions (MONAI-style losses): each takes its function's keywords,
with the function's defaults (read from its signature), checks them when it is built and passes
them on every call. The semantics and the keywords' meaning are documented on the functions in
:mod:`rcps_kernels.functional`.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from . import backends
from . import validation as v
from .functional import bidirectional_voxel_infonce, logit_cosine_consistency, rectified_pseudo_supervision


def _keyword_defaults(function) -> dict[str, object]:
    """The defaults of `function`'s keyword-only parameters (its options), by name."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


_INFONCE_DEFAULTS = _keyword_defaults(bidirectional_voxel_infonce)
_RECTIFIED_DEFAULTS = _keyword_defaults(rectified_pseudo_supervision)
_COSINE_DEFAULTS = _keyword_defaults(logit_cosine_consistency)


class BidirectionalVoxelContrastiveLoss(nn.Module):
    """Module form of :func:`rcps_kernels.bidirectional_voxel_infonce` (RCPS's L_bc).

    Args: the function's keywords, with its defaults; every one is stored and used on each call.

    Raises:
        TypeError, ValueError: a keyword the function would refuse (checked here, not at the first call).

    Example::

        loss_fn = BidirectionalVoxelContrastiveLoss(num_negatives=400, temperature=0.1)
        loss = loss_fn(proj_aug1, proj_aug2, proj_other_orig, logits_orig, logits_other_orig)
    """

    def __init__(
        self,
        num_negatives: int = _INFONCE_DEFAULTS["num_negatives"],
        temperature: float = _INFONCE_DEFAULTS["temperature"],
        sampling: str = _INFONCE_DEFAULTS["sampling"],
        confidence_threshold: float = _INFONCE_DEFAULTS["confidence_threshold"],
        generator: torch.Generator | None = _INFONCE_DEFAULTS["generator"],
        reduction: str = _INFONCE_DEFAULTS["reduction"],
        backend: str = _INFONCE_DEFAULTS["backend"],
        deterministic: bool | None = _INFONCE_DEFAULTS["deterministic"],
    ) -> None:
        super().__init__()
        v.check_infonce_options(
            num_negatives, temperature, sampling, confidence_threshold, generator, reduction, deterministic
        )
        backends.check_name(backend)
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
    """Module form of :func:`rcps_kernels.rectified_pseudo_supervision` (L_urp).

    Args: the function's keywords (temperature, reduction, backend), with its defaults.

    Raises:
        TypeError, ValueError: a keyword the function would refuse (checked here, not at the first call).
    """

    def __init__(
        self,
        temperature: float = _RECTIFIED_DEFAULTS["temperature"],
        reduction: str = _RECTIFIED_DEFAULTS["reduction"],
        backend: str = _RECTIFIED_DEFAULTS["backend"],
    ) -> None:
        super().__init__()
        v.check_loss_options(reduction, temperature=temperature)
        backends.check_name(backend)
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The loss (see the function)."""
        return rectified_pseudo_supervision(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
        )


class LogitCosineConsistencyLoss(nn.Module):
    """Module form of :func:`rcps_kernels.logit_cosine_consistency` (L_cr).

    Args: the function's keywords (eps, reduction, backend), with its defaults.

    Raises:
        TypeError, ValueError: a keyword the function would refuse (checked here, not at the first call).
    """

    def __init__(
        self,
        eps: float = _COSINE_DEFAULTS["eps"],
        reduction: str = _COSINE_DEFAULTS["reduction"],
        backend: str = _COSINE_DEFAULTS["backend"],
    ) -> None:
        super().__init__()
        v.check_loss_options(reduction, eps=eps)
        backends.check_name(backend)
        self.eps = eps
        self.reduction = reduction
        self.backend = backend

    def forward(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        """The loss (see the function)."""
        return logit_cosine_consistency(
            logits_a, logits_b, eps=self.eps, reduction=self.reduction, backend=self.backend
        )
