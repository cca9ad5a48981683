"""TensorBoard logging (``log.tensorboard``): the scalars and images a run writes, read back with TensorBoard's own
event reader; a killed and resumed run holds each step once; a missing package stops the run before step 1."""

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rcps_train import engine
from rcps_train.config import ConfigError, load_config
from rcps_train.losses import TERMS
from tests.trainer.tiny_data import die_at_step, tiny_dataset, tiny_overrides


def _config(data, out, name, **extra):
    values = {"run.name": f'"{name}"', "log.tensorboard": "true", "train.checkpoint_every": 2, **extra}
    return load_config(None, tiny_overrides(data, out, **values))


def _events(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _steps(events, tag):
    return [event.step for event in events.Scalars(tag)]


def test_a_run_logs_every_term_per_step_and_validation_per_epoch(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    engine.train(_config(data, tmp_path, "tb"))
    events = _events(tmp_path / "tb")
    scalars = set(events.Tags()["scalars"])
    expected = {f"loss/{name}" for name in TERMS} | {"loss/total", "schedule/lr", "schedule/ramp"}
    assert expected | {"system/step_time_s", "system/peak_mem_mb", "val/dice", "val/hd95"} <= scalars
    assert _steps(events, "loss/total") == [1, 2, 3, 4]
    assert _steps(events, "val/dice") == [2, 4]  # after each of the 2 epochs of 2 steps
    assert events.Scalars("schedule/lr")[0].value == pytest.approx(1e-4)
    assert {tag.rsplit("/", 1)[1] for tag in events.Tags()["images"]} == {"image", "label", "prediction"}


def test_killed_and_resumed_run_holds_each_step_once(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    engine.train(_config(data, tmp_path, "full"))
    real_step = die_at_step(monkeypatch, 4)  # the checkpoint is at step 2; steps 3 (and the kill) follow it
    config = _config(data, tmp_path, "killed")
    with pytest.raises(KeyboardInterrupt):
        engine.train(config)
    monkeypatch.setattr(engine, "train_step", real_step)
    engine.train(config, resume=True)
    full, resumed = _events(tmp_path / "full"), _events(tmp_path / "killed")
    for tag in ("loss/total", "loss/bc_u", "schedule/lr", "val/dice"):
        assert _steps(resumed, tag) == _steps(full, tag), tag
    # Resume after kill -9 is exact, so the curves are the same numbers too.
    assert [e.value for e in resumed.Scalars("loss/total")] == [e.value for e in full.Scalars("loss/total")]


def test_without_the_package_the_run_stops_before_reading_data(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importlib then finds no such package
    with pytest.raises(ConfigError, match=r"log.tensorboard = true needs the tensorboard package.*\[tensorboard\]"):
        engine.train(_config(tmp_path / "no-data-here", tmp_path, "tb"))
