"""The unlabeled data loader: nnU-Net's loader drawing random patches only."""

from __future__ import annotations

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class UnlabeledDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` without foreground oversampling or annotated-region sampling: every patch is a
    uniformly random crop (unlabeled cases have no foreground locations).

    Args:
        data, batch_size, patch_size, final_patch_size, label_manager, transforms: as ``nnUNetDataLoader``.
    """

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None):
        super().__init__(
            data,
            batch_size,
            patch_size,
            final_patch_size,
            label_manager,
            oversample_foreground_percent=0.0,
            transforms=transforms,
        )
        # With an ignore label nnU-Net samples from annotated voxels; unlabeled cases have none.
        self.has_ignore = False
