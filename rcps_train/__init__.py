"""rcps_train: a lean trainer for RCPS semi-supervised 3D segmentation on top of ``rcps_kernels``.

Modules, in the order a training run uses them: ``config`` (TOML + overrides), ``data`` and ``augment``
(loading, crops, grid distortion, intensity views), ``model`` (ProjectorUNet), ``losses`` (L_seg and the
RCPS terms from ``rcps_kernels``), ``engine`` (set-up, epochs, steps), ``checkpoint`` (checkpoints, RNG
streams and CSV logs, for resuming), ``evaluate`` and ``metrics`` (sliding window, Dice/HD95/ASD),
``distributed`` (torchrun/DDP), ``synthetic`` (a generated dataset), ``plots`` and ``cli`` (``rcps-train``).
"""

__version__ = "0.1.0"
