"""rcps_nnunet: RCPS semi-supervised training inside nnU-Net v2 (the ``nnunet`` extra; docs/nnunet.md).

- ``nnUNetTrainerRCPS`` (``rcps_nnunet.trainer``): a subclass of nnU-Net's trainer that nnU-Net finds through
  ``nnUNet_extTrainer`` pointed at ``ext_trainers/`` (a folder holding only the trainer package).
- ``rcps-nnunet`` (``rcps_nnunet.cli``): preprocess-unlabeled, train, predict, trainer-path.
- ``unlabeled.py``: the ``imagesUnlabeled/`` raw folder and its preprocessing with the labeled plans;
  ``losses.py``: the RCPS terms on nnU-Net's deep-supervision outputs; ``settings.py``: the RCPS settings;
  ``network.py``: where the projection head attaches; ``environment.py``: the nnunetv2 version and folder checks.

Importing this package does not import nnunetv2 (the CLI checks its version first).
"""
