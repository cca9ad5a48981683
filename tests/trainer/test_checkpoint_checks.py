"""--resume with a changed config, and ``rcps-train eval`` on files that are not checkpoints of the trainer or whose
weights do not fit their config: each stops with ``rcps-train: error`` naming the file and what was expected."""

import shutil

import pytest
import torch

from rcps_train import engine
from rcps_train.cli import main
from rcps_train.config import load_config
from tests.trainer.tiny_data import tiny_dataset, tiny_overrides


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after its first step: (data root, run folder)."""
    root = tmp_path_factory.mktemp("stopped")
    data = tiny_dataset(root / "data", num_train=3, num_val=1)
    engine.train(load_config(None, tiny_overrides(data, root, **{"run.name": '"run"', "train.stop_after_steps": 1})))
    return data, root / "run"


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    data, run = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return data, copy


def _resume(run_dir, *overrides):
    # The resolved config.toml of the run folder sets run.out_dir to the original parent: point it at the copy.
    args = ["train", "--config", str(run_dir / "config.toml"), "--resume", "--set", f'run.out_dir="{run_dir.parent}"']
    for item in overrides:
        args += ["--set", item]
    return main(args)


def test_resume_with_a_changed_config_lists_the_keys_and_keeps_the_run_folder(run_copy, capsys):
    _, run_dir = run_copy
    config_text = (run_dir / "config.toml").read_bytes()
    assert _resume(run_dir, "train.epochs=3", "train.lr=0.02") == 2
    err = capsys.readouterr().err
    assert err.startswith("rcps-train: error: --resume") and "Traceback" not in err
    assert "train.epochs: 2 -> 3" in err and "train.lr: 0.01 -> 0.02" in err and "checkpoint.pt" in err
    assert (run_dir / "config.toml").read_bytes() == config_text
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 1


def test_resume_with_other_model_widths_is_a_config_error(run_copy, capsys):
    _, run_dir = run_copy
    assert _resume(run_dir, "model.widths=[4, 8, 8, 16, 32]") == 2
    assert "model.widths: [4, 8, 8, 16, 16] -> [4, 8, 8, 16, 32]" in capsys.readouterr().err


def test_resume_may_change_keys_that_leave_the_run_unchanged(run_copy, capsys):
    _, run_dir = run_copy
    assert _resume(run_dir, "train.stop_after_steps=2", "train.checkpoint_every=5") == 0
    printed = capsys.readouterr().out
    assert "train.stop_after_steps: 1 -> 2" in printed and "train.checkpoint_every: 100 -> 5" in printed
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 2
    assert "stop_after_steps = 2" in (run_dir / "config.toml").read_text()


def test_checkpoint_entries_keep_their_names(run_copy):
    _, run_dir = run_copy
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert set(state) == {
        "model",
        "in_channels",
        "preprocessing",
        "data",
        "optimizer",
        "scaler",
        "epoch",
        "step_in_epoch",
        "global_step",
        "rng",
        "val_history",
        "config",
    }


def test_resume_from_a_checkpoint_written_before_the_newer_entries(run_copy, capsys):
    _, run_dir = run_copy
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    for entry in ("in_channels", "preprocessing", "data"):  # added with multi-channel data, prepare, the data record
        del state[entry]
    torch.save(state, run_dir / "checkpoint.pt")
    assert _resume(run_dir, "train.stop_after_steps=2") == 0, capsys.readouterr().err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 2


def test_resume_from_an_unreadable_checkpoint_names_it(run_copy, capsys):
    _, run_dir = run_copy
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _resume(run_dir) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and str(run_dir / "checkpoint.pt") in err


def _edited_checkpoint(run_dir, path, edit):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    torch.save(edit(state), path)
    return path


def _with_config(state, section, **values):
    state["config"][section].update(values)
    return state


def _with_three_classes(state):
    return _with_config(state, "data", num_classes=3) and _with_config(state, "loss", class_weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            _with_three_classes,
            "holds weights for 2 classes (heads.3.weight of shape (2, 4, 1, 1, 1)) "
            "but its config has data.num_classes = 3",
        ),
        (
            lambda s: _with_config(s, "model", widths=[4, 8, 8, 16, 32]),
            "its weights do not fit the model of its config (model.widths = [4, 8, 8, 16, 32]",
        ),
        (
            lambda s: {"model": s["model"]},
            "is not an rcps-train checkpoint: expected a dict with entries model, config",
        ),
        (lambda s: s["model"]["heads.3.weight"], "found a Tensor"),
        (lambda s: _with_config(s, "loss", temperature=0.1), "unknown key 'loss.temperature'"),
        (lambda s: _with_config(s, "train", lr=float("nan")), "'train.lr' = nan is not a finite number"),
    ],
    ids=["class-count", "widths", "no-config", "tensor", "unknown-key", "bad-value"],
)
def test_eval_names_a_checkpoint_that_does_not_fit(run_copy, tmp_path, capsys, edit, expected):
    data, run_dir = run_copy
    path = _edited_checkpoint(run_dir, tmp_path / "edited.pt", edit)
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcps-train: error") and str(path) in err and expected in err
    assert not (tmp_path / "out").exists()


def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert f"cannot read checkpoint {path}" in capsys.readouterr().err
