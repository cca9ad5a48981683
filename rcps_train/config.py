"""Run configuration: nested defaults, TOML files (stdlib ``tomllib``), ``--set key=value`` overrides, checks.

Every knob of a run is declared once in :data:`rcps_train.knobs.KNOBS`; :data:`DEFAULTS`, :data:`RULES`,
:data:`RESUME_SAFE_KEYS` and the reference ``docs/config.md`` (``rcps-train config-reference``) come
from there. A TOML file overrides any subset of the defaults. Unknown keys and values of the wrong type are errors
that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import math

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path
from typing import Any

from .knobs import KNOBS, Rule

#: ``{section: {key: default}}`` in declaration order.
DEFAULTS: dict[str, dict[str, Any]] = {}
for _dotted, _knob in KNOBS.items():
    _section, _, _key = _dotted.partition(".")
    DEFAULTS.setdefault(_section, {})[_key] = copy.deepcopy(_knob.default)

#: The check of every ``section.key`` (cross-key checks are in :func:`validate`).
RULES: dict[str, Rule] = {dotted: knob.rule for dotted, knob in KNOBS.items()}

#: Keys a ``--resume`` may change (see :data:`rcps_train.knobs.KNOBS` for why these).
RESUME_SAFE_KEYS = frozenset(dotted for dotted, knob in KNOBS.items() if knob.resume_safe)


# A frozen attribute view per section (``SECTION_VIEWS["train"]`` has fields epochs, lr, ...), and of a whole config.
SECTION_VIEWS: dict[str, type] = {
    section: dataclasses.make_dataclass(
        f"{section.title()}Settings",
        [(key, KNOBS[f"{section}.{key}"].types or type(default)) for key, default in values.items()],
        frozen=True,
    )
    for section, values in DEFAULTS.items()
}
RunSettings = dataclasses.make_dataclass("RunSettings", list(SECTION_VIEWS.items()), frozen=True)


def run_settings(config: dict) -> RunSettings:
    """A read-only attribute view of a resolved config, e.g. ``run_settings(config).train.epochs``.

    Args:
        config: a resolved config (every key present, as :func:`load_config` returns it).

    Returns:
        A frozen record per section; it reflects ``config`` as it is now (build it again after edits).
    """
    return RunSettings(**{section: SECTION_VIEWS[section](**values) for section, values in config.items()})


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names it."""


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list) and all(_type_ok(default[0], v) for v in value)
    return isinstance(value, type(default))


def _merge(base: dict, update: dict, source: str) -> None:
    for section, values in update.items():
        if section not in base:
            hint = difflib.get_close_matches(section, base, n=1)
            suggestion = f" (did you mean [{hint[0]}]?)" if hint else ""
            raise ConfigError(f"{source}: unknown section [{section}]{suggestion}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in values.items():
            _set(base, f"{section}.{key}", value, source)


def _set(config: dict, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in config or key not in config[section]:
        known = [f"{s}.{k}" for s in config for k in config[s]]
        hint = difflib.get_close_matches(dotted, known, n=1)
        raise ConfigError(f"{source}: unknown key '{dotted}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    problem = _value_problem(dotted, value)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    config[section][key] = _as_default_type(DEFAULTS[section][key], value)


def _as_default_type(default: Any, value: Any) -> Any:
    """Ints where the default is a float (or a list of floats) become floats: ``lr = 1``, ``[1, 10]``."""
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list) and isinstance(default[0], float):
        return [float(v) for v in value]
    return value


def _value_problem(dotted: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the known key ``dotted`` (its type, then its rule), or None."""
    knob = KNOBS[dotted]
    default = knob.default
    if knob.types:
        ok = isinstance(value, knob.types) and not isinstance(value, bool)
    else:
        ok = _type_ok(default, value)
    if not ok:
        return f"'{dotted}' = {value!r} has the wrong type (expected like {default!r})"
    if not knob.rule.holds(value):
        return f"'{dotted}' = {value!r} is not {knob.rule.expected}"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as TOML (``3``, ``0.1``, ``[96, 96, 96]``, ``true``), else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    base: dict | None = None,
    base_source: str = "base config",
) -> dict:
    """Build a run configuration.

    Args:
        path: a TOML file, or the name of a shipped config (``demo``, ``la``, ``pancreas``, ``synthetic``).
        overrides: ``key=value`` strings applied last, e.g. ``train.epochs=3``.
        base: a config (e.g. one stored in a checkpoint) applied over the defaults before the file; its keys are
            checked like a file's, and keys it lacks keep their defaults.
        base_source: how error messages name ``base``.

    Returns:
        The nested dict, every key present, validated.
    """
    config = copy.deepcopy(DEFAULTS)
    if base is not None:
        if not isinstance(base, dict):
            raise ConfigError(f"{base_source}: expected a table of sections, got {type(base).__name__}")
        _merge(config, base, base_source)
    if path is not None:
        text, source = read_config_text(path)
        try:
            _merge(config, tomllib.loads(text), source)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML: {err}") from None
    for item in overrides:
        key, value = parse_override(item)
        _set(config, key, value, f"--set {item}")
    validate(config)
    return config


def read_config_text(path: str | Path) -> tuple[str, str]:
    """Text of a config file, or of a shipped one when ``path`` is a bare name like ``demo``."""
    path = Path(path)
    if path.exists():
        return path.read_text(), str(path)
    shipped = importlib.resources.files("rcps_train") / "configs" / f"{path.stem}.toml"
    if path.suffix in ("", ".toml") and path.parent == Path(".") and shipped.is_file():
        return shipped.read_text(), f"rcps_train/configs/{path.stem}.toml"
    raise ConfigError(f"config file {str(path)!r} does not exist (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(
        p.name[:-5] for p in (importlib.resources.files("rcps_train") / "configs").iterdir() if p.name.endswith(".toml")
    )


def validate(config: dict) -> None:
    """Check every key against :data:`RULES`, then what single keys cannot say on their own.

    Raises:
        ConfigError: naming the first bad key and what it expects.
    """
    expected = {f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s]}
    present = {f"{s}.{k}" for s, values in config.items() for k in values}
    if present != expected:
        raise ConfigError(f"config keys missing: {sorted(expected - present)}, unknown: {sorted(present - expected)}")
    for dotted in sorted(expected):
        section, _, key = dotted.partition(".")
        problem = _value_problem(dotted, config[section][key])
        if problem:
            raise ConfigError(problem)
    data, train, loss = config["data"], config["train"], config["loss"]
    if len(loss["class_weights"]) != data["num_classes"]:
        raise ConfigError(
            f"loss.class_weights has {len(loss['class_weights'])} entries, data.num_classes is {data['num_classes']}"
        )
    # BatchNorm in training needs more than one value per channel at the deepest level (1/16 of the patch);
    # an RCPS step stacks 6 volumes per patch, a supervised step only the labeled one.
    volumes = train["batch_size"] * (6 if train["method"] == "rcps" else 1)
    if volumes * math.prod(-(-n // 16) for n in data["patch_size"]) < 2:
        raise ConfigError(
            f"data.patch_size = {data['patch_size']} leaves one voxel per channel at the deepest level "
            f"with train.method = {train['method']!r} and train.batch_size = {train['batch_size']} "
            f"({volumes} volumes a step), too few for BatchNorm; use a patch larger than 16 on some "
            f"axis or a larger batch"
        )


def resume_changes(stored: dict, requested: dict, source: str) -> list[str]:
    """Compare the config a checkpoint was written with to the one a ``--resume`` asks for.

    Args:
        stored: the checkpoint's config (keys it lacks take their defaults).
        requested: the resolved config of the resumed run.
        source: the checkpoint, for messages.

    Returns:
        ``"key: old -> new"`` for each changed key of :data:`RESUME_SAFE_KEYS`.

    Raises:
        ConfigError: listing every other changed key.
    """
    stored = load_config(None, base=stored, base_source=f"{source} (its stored config)")
    changes = {
        f"{s}.{k}": f"{s}.{k}: {stored[s][k]!r} -> {requested[s][k]!r}"
        for s in requested
        for k in requested[s]
        if stored[s][k] != requested[s][k]
    }
    unsafe = [text for key, text in changes.items() if key not in RESUME_SAFE_KEYS]
    if unsafe:
        raise ConfigError(
            f"--resume: the config differs from the one {source} was written with ("
            + "; ".join(unsafe)
            + "). Resume with the run folder's config.toml, or start a new run.name"
        )
    return list(changes.values())


def toml_value(value: Any) -> str:
    """One config value as TOML text (``true``, ``"text"``, ``[1, 2]``, ``0.1``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    return repr(value)


def to_toml(config: dict) -> str:
    """Serialise a resolved config (flat tables of scalars and lists) as TOML."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def config_reference() -> str:
    """The Markdown reference of every config key (``docs/config.md``), generated from the knob declarations.

    Returns:
        A document with one table per section: key, default, allowed values, whether ``--resume`` may change it,
        and its one-line help.
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "\\<")  # a table cell; <root> is not an HTML tag

    lines = [
        "# Run configuration reference",
        "",
        "<!-- Generated by `rcps-train config-reference > docs/config.md` from rcps_train/knobs.py; "
        "do not edit by hand. -->",
        "",
        "Every key of a run config, with its default. A TOML file (`rcps-train train --config FILE.toml`) sets any "
        "subset of them in `[section]` tables, and `--set section.key=value` (the value read as TOML) overrides "
        "a key last. *Resume* says whether `--resume` may change the key: any other change makes the resumed run "
        "a different run, so it is refused.",
    ]
    for section, values in DEFAULTS.items():
        lines += ["", f"## [{section}]", "", "| key | default | allowed | resume | meaning |", "|---|---|---|---|---|"]
        for key in values:
            knob = KNOBS[f"{section}.{key}"]
            row = (f"`{key}`", f"`{toml_value(knob.default)}`", knob.rule.expected, "yes" if knob.resume_safe else "no")
            lines.append("| " + " | ".join(cell(text) for text in (*row, knob.help)) + " |")
    return "\n".join(lines) + "\n"
