"""The RCPS settings of ``nnUNetTrainerRCPS``: defaults, the ``RCPS_NNUNET_SETTINGS`` variable, checks.

nnU-Net's ``nnUNetv2_train`` has no flags a trainer could add, so the settings travel in an environment variable
(a JSON object; ``rcps-nnunet train --rcps key=value`` writes it), which DDP workers inherit. A run stores the
settings it used in its output folder and in every checkpoint; a resumed run takes them from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

#: The environment variable holding a JSON object of settings that differ from the defaults.
SETTINGS_VARIABLE = "RCPS_NNUNET_SETTINGS"

SAMPLING_MODES = ("topk", "random")
BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")


@dataclasses.dataclass(frozen=True)
class RCPSSettings:
    """The knobs of the RCPS objective (docs/nnunet.md has the table).

    Attributes:
        alpha: weight of L_urp + L_cr.
        beta: weight of the voxel InfoNCE L_bc.
        tau: InfoNCE temperature.
        sharpen_temperature: T of the rectified pseudo-label.
        num_negatives: K, negatives per anchor.
        sampling: "topk" (official) or "random".
        confidence_threshold: minimum confidence of a negative for sampling = "random".
        rampup_epochs: epochs of the sigmoid ramp-up of the unlabeled weights; 0: the whole run.
        project_dim: channels of the projection head.
        unlabeled_batch_size: unlabeled patches per step and device; 0: the plans' (per-device) batch size.
        backend: ``rcps_kernels`` backend.
        seed: seeds the intensity views and the random negative draws (plus the rank under DDP).
    """

    alpha: float = 0.1
    beta: float = 0.1
    tau: float = 0.1
    sharpen_temperature: float = 0.5
    num_negatives: int = 400
    sampling: str = "topk"
    confidence_threshold: float = 0.0
    rampup_epochs: int = 0
    project_dim: int = 64
    unlabeled_batch_size: int = 0
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_value(field.name, getattr(self, field.name), field.type)

    def as_dict(self) -> dict:
        """The settings as a plain dict (what checkpoints and ``rcps_settings.json`` hold)."""
        return dataclasses.asdict(self)


def _number_ok(value, low: float, low_open: bool = False, high: float = math.inf) -> bool:
    return math.isfinite(value) and (value > low if low_open else value >= low) and value <= high


# What each key must be besides its type: (check, "must be ..." wording).
_RULES = {
    "alpha": (lambda v: _number_ok(v, 0.0), "a finite number >= 0"),
    "beta": (lambda v: _number_ok(v, 0.0), "a finite number >= 0"),
    "tau": (lambda v: _number_ok(v, 2.0**-125), "a finite number >= 2**-125"),
    "sharpen_temperature": (lambda v: _number_ok(v, 0.0, low_open=True), "a finite number > 0"),
    "num_negatives": (lambda v: v >= 1, "an integer >= 1"),
    "sampling": (lambda v: v in SAMPLING_MODES, f"one of {SAMPLING_MODES}"),
    "confidence_threshold": (lambda v: _number_ok(v, 0.0, high=1.0), "a number in [0, 1]"),
    "rampup_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "project_dim": (lambda v: v >= 1, "an integer >= 1"),
    "unlabeled_batch_size": (lambda v: v >= 0, "an integer >= 0"),
    "backend": (lambda v: v in BACKENDS, f"one of {BACKENDS}"),
    "seed": (lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)"),
}


def _check_value(key: str, value, kind: str) -> None:
    """Raise ValueError naming ``key`` unless ``value`` has the field's type and passes its rule."""
    if kind == "float":
        type_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "int":
        type_ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        type_ok = isinstance(value, str)
    holds, expected = _RULES[key]
    if not type_ok or not holds(value):
        raise ValueError(f"RCPS setting {key!r} must be {expected}, got {value!r}")


def parse_overrides(text: str | None) -> dict:
    """The settings a ``RCPS_NNUNET_SETTINGS`` value overrides, checked.

    Args:
        text: a JSON object (None or blank: no overrides).

    Returns:
        ``{key: value}`` of valid keys and values.
    """
    if text is None or not text.strip():
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{SETTINGS_VARIABLE} must be a JSON object such as '{{\"alpha\": 0.2}}': {err}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"{SETTINGS_VARIABLE} must be a JSON object, got {type(overrides).__name__}")
    known = {field.name for field in dataclasses.fields(RCPSSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{SETTINGS_VARIABLE} has unknown keys {unknown}; known: {sorted(known)}")
    RCPSSettings(**overrides)  # checks every value
    return overrides


def overrides_from_environment() -> dict:
    """The checked overrides in the ``RCPS_NNUNET_SETTINGS`` environment variable."""
    return parse_overrides(os.environ.get(SETTINGS_VARIABLE))


def resolve_settings(overrides: dict, saved: dict | None) -> RCPSSettings:
    """The settings of a run: the defaults with ``overrides``, or for a resumed run the ``saved`` ones.

    Args:
        overrides: from :func:`overrides_from_environment`.
        saved: the settings a resumed run stored, or None for a new run.

    Returns:
        The settings.

    Raises:
        ValueError: an override contradicts a saved setting (a resumed run continues as it started).
    """
    if saved is None:
        return RCPSSettings(**overrides)
    conflicts = {key: (value, saved.get(key)) for key, value in overrides.items() if saved.get(key) != value}
    if conflicts:
        listed = ", ".join(f"{key}={new!r} (the run used {old!r})" for key, (new, old) in conflicts.items())
        raise ValueError(
            f"{SETTINGS_VARIABLE} contradicts the settings of the run being resumed: {listed}; "
            "resume with the same settings or none"
        )
    return RCPSSettings(**saved)


def cli_overrides(pairs: list[str]) -> dict:
    """``key=value`` strings (``rcps-nnunet train --rcps``) as checked overrides; values are JSON or plain text.

    Args:
        pairs: e.g. ``["alpha=0.2", "sampling=random"]``.

    Returns:
        ``{key: value}``.
    """
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rcps takes key=value, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return parse_overrides(json.dumps(overrides))
