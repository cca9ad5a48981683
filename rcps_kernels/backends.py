"""The backends, for code outside the ops (a trainer's config check, ``info``): their names and
whether one can run on a device.
"""

from __future__ import annotations

import torch

from ._backend import BACKENDS, resolve_backend

#: Every value ``backend=`` takes, "auto" first.
NAMES: tuple[str, ...] = BACKENDS


def resolve(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend=backend`` runs for tensors on `device`.

    Args:
        backend: one of :data:`NAMES`.
        device: where the inputs will live.

    Returns:
        The backend's name ("auto" resolved).

    Raises:
        ValueError: an unknown backend, or one that cannot take tensors on `device`.
        RuntimeError: a backend that is not usable here (its extension is not built, ...).
    """
    return resolve_backend(backend, torch.device(device), tuple(name for name in NAMES if name != "auto"))
