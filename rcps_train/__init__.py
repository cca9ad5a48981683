"""rcps_train: a lean trainer for RCPS semi-supervised 3D segmentation on top of ``rcps_kernels``.

Modules, in the order a training run uses them: ``knobs`` (every config key, declared once) and ``config``
(TOML + overrides, checks, the generated reference), ``layouts`` (where the cases lie on disk), ``data`` and
``augment`` (splits, loading, checks, crops, grid distortion, intensity views), ``model`` (ProjectorUNet, how a run
builds it and lays out its tensors), ``losses`` (L_seg and the RCPS terms from ``rcps_kernels``), ``step`` (one
optimisation step and its context), ``run`` (the state a run carries), ``engine`` (set-up, epochs, validation, test
scoring), ``checkpoint`` and
``files`` (the checkpoint format, RNG streams, atomic files and CSV logs, for resuming),
``evaluate``, ``metrics`` and ``rescore`` (sliding window, Dice/HD95/ASD, ``rcps-train eval``),
``tensorboard_log``, ``distributed`` (torchrun/DDP), ``synthetic`` (a generated dataset), ``plots``; around
them ``raw_layouts``, ``prepare``, ``recipes``, ``geometry`` and ``predict`` (raw scans in, segmentations out), ``cli``
(``rcps-train``) and ``deprecation`` (old names that still work).
"""

__version__ = "0.1.0"
