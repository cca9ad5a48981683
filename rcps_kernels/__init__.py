"""rcps_kernels: fused, exact, O(anchors)-memory kernels for the RCPS segmentation losses.

Public API (all take MONAI-style ``(B, C, *spatial)`` tensors and a ``backend=`` switch):

- :func:`bidirectional_voxel_infonce` / :class:`BidirectionalVoxelContrastiveLoss`: the
  bidirectional voxel InfoNCE with confident negative sampling.
- :func:`select_confident_negatives`: the per-class top-K negative banks.
- :func:`rectified_pseudo_supervision` (L_urp), :func:`logit_cosine_consistency` (L_cr) and
  :func:`pseudo_supervision_losses` (one head's L_urp on two views and L_cr, in one op).
"""
__version__ = "0.1.0"

from .functional import bidirectional_voxel_infonce, random_negative_draws  # noqa: F401
from .modules import BidirectionalVoxelContrastiveLoss  # noqa: F401
from .selection import select_confident_negatives  # noqa: F401
from .pseudo_supervision import rectified_pseudo_supervision, logit_cosine_consistency, RectifiedPseudoSupervisionLoss, LogitCosineConsistencyLoss  # noqa: F401
from .head_losses import pseudo_supervision_losses  # noqa: F401
