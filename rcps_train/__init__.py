"""rcps_train: a lean trainer for RCPS semi-supervised 3D segmentation on top of ``rcps_kernels``.

Modules, in the order a training run uses them: ``config`` (TOML + overrides), ``layouts`` (where the cases
lie on disk), ``data`` and ``augment`` (splits, loading, checks, crops, grid distortion, intensity views),
``model`` (ProjectorUNet), ``losses`` (L_seg and the RCPS terms from ``rcps_kernels``), ``engine`` (set-up,
epochs, steps), ``checkpoint`` and ``files`` (checkpoints, RNG streams, atomic files and CSV logs, for resuming),
``evaluate``, ``metrics`` and ``rescore`` (sliding window, Dice/HD95/ASD, ``rcps-train eval``),
``tensorboard_log``, ``distributed`` (torchrun/DDP), ``synthetic`` (a generated dataset), ``plots``; around
them ``prepare``, ``recipes``, ``geometry`` and ``predict`` (raw scans in, segmentations out) and ``cli``
(``rcps-train``).
"""

__version__ = "0.1.0"
