"""nnU-Net looks trainers up by module attribute: the class itself lives in ``rcps_nnunet.trainer``, an ordinary
importable module, so DDP workers and data-augmentation processes unpickle it like any other class."""

from rcps_nnunet.trainer import nnUNetTrainerRCPS

__all__ = ["nnUNetTrainerRCPS"]
