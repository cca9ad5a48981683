"""Fuzzing the config through the CLI: every run either stops before its first training step with
``rcps-train: error`` naming a key it set, or it validates and then really starts: the data loads, the model is
built, the first batch arrives, the first step gives finite losses, and the evaluation windows run."""

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from rcps_train import engine
from rcps_train.cli import main
from rcps_train.config import DEFAULTS
from rcps_train.evaluate import eval_settings, sliding_window_inference
from rcps_train.synthetic import make_synthetic_dataset

KEYS = sorted(f"{section}.{key}" for section in DEFAULTS for key in DEFAULTS[section])
# Valid and invalid values around every kind of bound: signs, zero, 32/64-bit limits, beyond float64.
SPECIAL_INTS = [-(2**63), -1, 0, 1, 2, 3, 2**31 - 1, 2**31, 2**63, 10**400]
SPECIAL_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    -1.0,
    -0.0,
    0.0,
    5e-324,
    1e-300,
    1e-7,
    1e-6,
    0.1,
    0.5,
    0.999,
    1.0,
    1.5,
    2.0,
    10.0,
    1e3,
    1e4,
    1e300,
]
WORDS = [
    "auto",
    "cpu",
    "cuda",
    "triton",
    "reference",
    "nifti",
    "h5",
    "rcps",
    "supervised",
    "off",
    "fp16",
    "bf16",
    "topk",
    "random",
    "nnunet",
    "ssl-la",
    "ssl-pancreas",
    "on",
    ".",
    "",
]
# No path separators: fuzzed run and data folders stay inside the temporary working folder.
TEXT = st.text(alphabet="abxyz_-.09 ", max_size=6) | st.sampled_from(WORDS)


def _values(default):
    """Values of the default's type, mostly small (so that valid runs stay cheap and common enough to check the
    rules for looseness), edge values, and values of every other type."""
    wrong = st.booleans() | TEXT | st.floats(allow_nan=True) | st.lists(st.integers(0, 3), max_size=2)
    if isinstance(default, bool):
        likely = st.booleans()
    elif isinstance(default, int):
        likely, edges = st.integers(0, 6), st.integers(-3, 12) | st.sampled_from(SPECIAL_INTS)
    elif isinstance(default, float):
        likely, edges = st.floats(0.0, 1.0), st.floats(-2.0, 2.0) | st.sampled_from(SPECIAL_FLOATS) | st.integers(-2, 3)
    elif isinstance(default, str):
        likely, edges = st.sampled_from(WORDS), TEXT
    else:
        entries = _values(default[0])
        # Lists of the default's length are the interesting ones: their entries decide.
        likely, edges = st.lists(entries, min_size=len(default), max_size=len(default)), st.lists(entries, max_size=6)
    if isinstance(default, bool):
        edges = likely
    # Weights by hand: st.one_of flattens nested choices into equally likely leaves.
    return st.integers(0, 9).flatmap(lambda pick: likely if pick < 6 else edges if pick < 9 else wrong)


def _changes():
    pair = st.sampled_from(KEYS).flatmap(
        lambda dotted: st.tuples(st.just(dotted), _values(DEFAULTS[dotted.split(".")[0]][dotted.split(".")[1]]))
    )
    return st.lists(pair, min_size=1, max_size=3, unique_by=lambda item: item[0])


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # the alphabet above needs no escapes beyond JSON's
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)  # ints of any size; floats as TOML writes them, nan and inf included


def _base_config(data_root: Path) -> dict:
    """A run that takes milliseconds a step: 8^3 patches, widths 4..16, two steps in one epoch."""
    config = {section: dict(values) for section, values in DEFAULTS.items()}
    config["data"].update(root=str(data_root), labeled=1, patch_size=[8, 8, 8], num_workers=0)
    config["model"].update(widths=[4, 8, 8, 16, 16], project_dim=8)
    config["train"].update(epochs=1, max_steps_per_epoch=2, warmup_epochs=0, progress=False)
    config["loss"].update(num_negatives=8, sampling="random")  # the path that reads confidence_threshold
    config["eval"].update(every_epochs=0)
    return config


class SecondStepReached(Exception):
    """Raised when a run with a valid config asks for its second step: the first one, and everything done
    after it (log row, checkpoint schedule), went through."""


def _first_step_checked(real_step):
    """A stand-in for ``engine.train_step``: the real first step, then checks of its losses and of the
    evaluation windows; the second call stops the run."""
    calls = []

    def step(context, batch, ramp):
        if calls:
            raise SecondStepReached
        calls.append(1)
        values = real_step(context, batch, ramp)
        model, config = context.model, context.config
        assert all(math.isfinite(values[name]) for name in ("loss", "seg")), values
        assert all(torch.isfinite(p).all() for p in model.parameters()), "the first update made a weight non-finite"
        eval_cfg = config["eval"]
        window, stride, blending, _ = eval_settings(config)
        model.eval()
        # One voxel more than the window on each axis: at most 8 windows whatever the overlap.
        logits = sliding_window_inference(
            model.segment,
            torch.randn(1, 1, *(n + 1 for n in window)),
            window,
            stride,
            blending,
            eval_cfg["sw_batch_size"],
            eval_cfg["sigma_scale"],
        )
        assert torch.isfinite(logits).all()
        model.train()
        return values

    return step


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_train=3, num_val=1, shape=(12, 12, 10))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Hundreds of tiny steps: one thread each is faster than several competing for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _names_a_key(message: str, changes) -> bool:
    # The data layer names a missing dataset folder relative to the root: "<root>/train_images".
    return any(dotted in message or (dotted == "data.root" and "<root>" in message) for dotted, _ in changes)


def _run(data_root: Path, changes) -> str:
    """Write the base config with ``changes`` to a TOML file and run ``rcps-train train`` on it.

    Returns:
        ``"started"`` (the second step was reached), ``"finished"`` (a valid run that ended after one step:
        one-step epochs, stop_after_steps) or ``"refused"`` (rc 2 and a message naming a changed key).
    """
    config = _base_config(data_root)
    for dotted, value in changes:
        section, _, key = dotted.partition(".")
        config[section][key] = value
    text = "\n".join(
        f"[{section}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in values.items())
        for section, values in config.items()
    )
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        work = Path(tmp) / "a" / "b"  # fuzzed relative folders ("..") stay inside tmp
        work.mkdir(parents=True)
        patch.chdir(work)
        (work / "run.toml").write_text(text)
        patch.setattr(engine, "train_step", _first_step_checked(engine.train_step))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(["train", "--config", "run.toml"])
            except SecondStepReached:
                return "started"
    message = err.getvalue()
    if rc == 0:
        return "finished"
    assert rc == 2 and message.startswith("rcps-train: error") and _names_a_key(message, changes), message
    return "refused"


def _sweep(default) -> list:
    """Fixed values around every bound for a key with this default, and values of other types."""
    if isinstance(default, bool):
        return [True, False, 1, "true", [True]]
    if isinstance(default, int):
        return [-1, 0, 1, 2, 7, 2**31 - 1, 2**31, 10**400, 1.5, True, "1", [1]]
    if isinstance(default, float):
        return [
            math.nan,
            math.inf,
            -math.inf,
            -1.0,
            0.0,
            5e-324,
            1e-7,
            1e-6,
            0.5,
            1,
            1.0,
            2.0,
            1e3,
            1e4,
            1e300,
            True,
            "0.1",
            [0.1],
        ]
    if isinstance(default, str):
        return [*WORDS, "x y", 1, True, ["cpu"]]
    entries = [v for v in _sweep(default[0]) if not isinstance(v, list)]
    return [
        [],
        default[:-1],
        default + default[-1:],
        "x",
        1,
        *([v] + default[1:] for v in entries),
        *([v] * len(default) for v in entries[:6]),
    ]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("dotted", KEYS)
def test_each_key_at_its_edges_starts_or_stops_naming_it(data_root, dotted):
    section, _, key = dotted.partition(".")
    failures, outcomes = [], set()
    for value in _sweep(DEFAULTS[section][key]):
        try:
            outcomes.add(_run(data_root, [(dotted, value)]))
        except Exception as err:  # a crash after validation, or an error that does not name the key
            failures.append(f"{value!r}: {type(err).__name__}: {str(err)[:300]}")
    assert not failures, "\n".join(failures)
    assert "refused" in outcomes, outcomes  # values of other types at least


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
# Found by earlier runs: integer class weights reached the CE as a Long tensor.
@example(changes=[("loss.class_weights", [1, 1])])
@example(changes=[("data.num_classes", 3), ("loss.class_weights", [1.0, 2.0, 3.0])])
@example(changes=[("train.method", "supervised"), ("train.batch_size", 2)])
@given(changes=_changes())
def test_every_config_starts_or_stops_before_the_first_step_naming_a_key(data_root, changes):
    event(_run(data_root, changes))
