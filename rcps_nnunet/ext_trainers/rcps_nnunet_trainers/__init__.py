"""The package nnU-Net finds through ``nnUNet_extTrainer`` (``rcps-nnunet trainer-path`` prints its folder)."""
