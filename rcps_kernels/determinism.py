"""Whether the kernels take their deterministic path: the per-call ``deterministic=`` keyword, else
``torch.use_deterministic_algorithms``, else the deprecated ``RCPS_DETERMINISTIC=1``.

Kernels with a faster nondeterministic path (random sampling's pool gradient on a GPU) ask
:func:`deterministic_algorithms` when they run; the op bodies set the call's keyword with
:func:`deterministic_override`, in forward and in backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import torch

from . import settings

# The deterministic= keyword of a public call, while that call's kernels run (None: no per-call choice).
_DETERMINISTIC_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "rcps_deterministic_override", default=None
)


def deterministic_algorithms() -> bool:
    """Whether a kernel called now takes its deterministic path.

    Returns:
        The per-call ``deterministic=True/False`` (:func:`deterministic_override`) if one is in
        effect; otherwise torch's switch, ``torch.use_deterministic_algorithms``, read at this
        moment (as torch's own ops do), not at import.
    """
    override = _DETERMINISTIC_OVERRIDE.get()
    if override is not None:
        return override
    return torch.are_deterministic_algorithms_enabled() or _deprecated_environment_switch()


@contextlib.contextmanager
def deterministic_override(deterministic: bool | None):
    """Make :func:`deterministic_algorithms` answer `deterministic` inside the block.

    Args:
        deterministic: True/False forces the answer; None leaves it to torch's switch.
    """
    token = _DETERMINISTIC_OVERRIDE.set(deterministic)
    try:
        yield
    finally:
        _DETERMINISTIC_OVERRIDE.reset(token)


def _deprecated_environment_switch() -> bool:
    # RCPS_DETERMINISTIC=1 was the switch before torch's was followed. It still works, with a
    # warning, so that runs which relied on it for bitwise reproducibility do not silently lose it.
    if not settings.deprecated_deterministic():
        return False
    warn_deprecated_environment_switch()
    return True


@functools.lru_cache(maxsize=None)
def warn_deprecated_environment_switch() -> None:
    """Warn, once per process (``cache_clear()`` re-arms it), that RCPS_DETERMINISTIC=1 is deprecated."""
    warnings.warn(
        "rcps_kernels: RCPS_DETERMINISTIC=1 is deprecated; call "
        "torch.use_deterministic_algorithms(True), or pass deterministic=True to "
        "bidirectional_voxel_infonce / BidirectionalVoxelContrastiveLoss",
        FutureWarning,
        stacklevel=3,
    )
