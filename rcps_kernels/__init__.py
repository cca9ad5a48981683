"""rcps_kernels: fused, exact, O(anchors)-memory kernels for the RCPS segmentation losses.

Public API (all take MONAI-style ``(B, C, *spatial)`` tensors and a ``backend=`` switch):

- :func:`bidirectional_voxel_infonce` / :class:`BidirectionalVoxelContrastiveLoss`: the
  bidirectional voxel InfoNCE with confident negative sampling.
- :func:`select_confident_negatives`: the per-class top-K negative banks;
  :func:`random_negative_draws`: the negatives random sampling draws.
- :func:`rectified_pseudo_supervision` / :class:`RectifiedPseudoSupervisionLoss` (L_urp),
  :func:`logit_cosine_consistency` / :class:`LogitCosineConsistencyLoss` (L_cr) and
  :func:`pseudo_supervision_losses` (one head's L_urp on two views and L_cr, in one op).

Layout: ``functional.py`` (the functions), ``modules.py`` (the Modules), ``ops/`` (one file per
op with its custom ops, fakes and autograd; ``ops/kernels.py``, the kernel table per backend),
``reference/`` (plain PyTorch, the test oracle), ``validation.py`` (every input check),
``settings.py`` (every environment variable).
"""

__version__ = "0.1.0"

from .functional import (
    bidirectional_voxel_infonce,
    logit_cosine_consistency,
    pseudo_supervision_losses,
    random_negative_draws,
    rectified_pseudo_supervision,
    select_confident_negatives,
)
from .modules import (
    BidirectionalVoxelContrastiveLoss,
    LogitCosineConsistencyLoss,
    RectifiedPseudoSupervisionLoss,
)

__all__ = [
    "bidirectional_voxel_infonce",
    "select_confident_negatives",
    "random_negative_draws",
    "rectified_pseudo_supervision",
    "logit_cosine_consistency",
    "pseudo_supervision_losses",
    "BidirectionalVoxelContrastiveLoss",
    "RectifiedPseudoSupervisionLoss",
    "LogitCosineConsistencyLoss",
]
