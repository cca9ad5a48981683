"""rcps-nnunet's checks and settings: clear errors for a missing or untested nnunetv2, unset folders, bad unlabeled
data and bad settings; where the projection head attaches; how nnUNet_extTrainer is set. Fast: no training."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from rcps_nnunet import cli, environment
from rcps_nnunet.environment import NnUNetSetupError
from rcps_nnunet.network import ProjectionHead, projection_level
from rcps_nnunet.settings import SETTINGS_VARIABLE, RCPSSettings, cli_overrides, parse_overrides, resolve_settings


def test_missing_nnunetv2_names_the_extra(monkeypatch, capsys):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(NnUNetSetupError, match=r'nnunetv2 is not installed: pip install "rcps-kernels\[nnunet\]"'):
        environment.check_nnunet_version()
    assert cli.main(["train", "1", "3d_fullres", "0"]) == 2
    assert "nnunetv2 is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["2.7.3", "2.9.0", "3.0", "1.8.1"])
def test_untested_nnunetv2_release_is_refused(version):
    with pytest.raises(NnUNetSetupError, match=rf"nnunetv2 {version} is installed.*nnunetv2>=2.8,<2.9"):
        environment.check_nnunet_version(version)


@pytest.mark.parametrize("version", ["2.8", "2.8.1", "2.8.0rc1"])
def test_tested_nnunetv2_releases_pass(version):
    assert environment.check_nnunet_version(version) == version


def test_unset_and_missing_folders_are_named(monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(NnUNetSetupError, match="nnUNet_preprocessed, nnUNet_results are not set"):
        environment.require_folders("nnUNet_preprocessed", "nnUNet_results")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "absent"))
    with pytest.raises(NnUNetSetupError, match="do not exist: nnUNet_results="):
        environment.require_folders("nnUNet_preprocessed", "nnUNet_results")


@pytest.mark.parametrize(
    "argv", [["train", "1", "3d_fullres", "0"], ["predict", "-i", "x", "-o", "y"], ["preprocess-unlabeled", "1"]]
)
def test_every_command_reports_unset_folders(monkeypatch, capsys, argv):
    pytest.importorskip("nnunetv2")
    for name in environment.FOLDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(argv) == 2
    assert "not set: nnU-Net reads its data and results from" in capsys.readouterr().err


def test_trainer_folder_holds_only_the_trainer_package(capsys):
    assert cli.main(["trainer-path"]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(environment.TRAINER_FOLDER)
    entries = sorted(p.name for p in environment.TRAINER_FOLDER.iterdir() if p.name != "__pycache__")
    assert entries == ["rcps_nnunet_trainers"]


def test_ext_trainer_variable_keeps_user_folders(monkeypatch):
    ours = str(environment.TRAINER_FOLDER)
    assert environment.with_trainer_folder(None) == ours
    assert environment.with_trainer_folder(f"/a{os.pathsep}/b") == os.pathsep.join([ours, "/a", "/b"])
    assert environment.with_trainer_folder(f"/a{os.pathsep}{ours}") == f"/a{os.pathsep}{ours}"
    monkeypatch.setenv(environment.EXT_TRAINER_VARIABLE, "/mine")
    environment.export_trainer_folder()
    assert os.environ[environment.EXT_TRAINER_VARIABLE] == os.pathsep.join([ours, "/mine"])


def test_settings_from_the_command_line_and_the_variable():
    assert cli_overrides(["alpha=0.2", "sampling=random", "num_negatives=50"]) == {
        "alpha": 0.2,
        "sampling": "random",
        "num_negatives": 50,
    }
    assert parse_overrides(json.dumps({"tau": 0.2})) == {"tau": 0.2}
    assert parse_overrides(None) == {} and parse_overrides("  ") == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"alpha": -1}', "'alpha' must be a finite number >= 0"),
        ('{"num_negatives": 2.5}', "'num_negatives' must be an integer >= 1"),
        ('{"num_negatives": true}', "'num_negatives' must be an integer >= 1"),
        ('{"sampling": "all"}', "'sampling' must be one of"),
        ('{"alhpa": 0.1}', r"unknown keys \['alhpa'\]"),
        ("[1, 2]", "must be a JSON object, got list"),
        ("alpha=0.1", "must be a JSON object such as"),
    ],
)
def test_bad_settings_name_the_key(text, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(text)


def test_bad_rcps_flag_is_reported(capsys):
    pytest.importorskip("nnunetv2")
    assert cli.main(["train", "1", "3d_fullres", "0", "--rcps", "tau"]) == 2
    assert "--rcps takes key=value" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_settings():
    saved = RCPSSettings(alpha=0.3, project_dim=32).as_dict()
    assert resolve_settings({}, saved) == RCPSSettings(alpha=0.3, project_dim=32)
    assert resolve_settings({"alpha": 0.3}, saved).alpha == 0.3
    with pytest.raises(ValueError, match=r"alpha=0.1 \(the run used 0.3\)"):
        resolve_settings({"alpha": 0.1}, saved)
    assert resolve_settings({"beta": 0.5}, None) == RCPSSettings(beta=0.5)


def test_settings_variable_reaches_the_trainer_environment(monkeypatch):
    monkeypatch.setenv(SETTINGS_VARIABLE, '{"beta": 0.25}')
    from rcps_nnunet.settings import overrides_from_environment

    assert overrides_from_environment() == {"beta": 0.25}


@pytest.mark.parametrize(
    "pooling, level",
    [
        ([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], 2),  # isotropic: 1/4
        ([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]], 2),  # anisotropic: 1/4 in-plane, full across
        ([[1, 1, 1], [2, 2, 2], [2, 2, 2]], 1),  # too shallow for 1/4: the deepest decoded level
        ([[1, 1], [2, 2], [2, 2], [2, 2]], 2),  # 2D
        ([[1, 1, 1], [1, 1, 4], [2, 2, 1], [2, 2, 2]], 1),  # a factor 4 at once
    ],
)
def test_projection_level(pooling, level):
    assert projection_level(pooling) == level


@pytest.mark.parametrize("dims", [2, 3])
def test_projection_head_keeps_the_grid(dims):
    head = ProjectionHead(dims, 8, 16)
    features = torch.randn(2, 8, *([5] * dims))
    assert head(features).shape == (2, 16, *([5] * dims))


def test_config_reads_toml_with_tomli_where_tomllib_is_missing():
    """Python 3.10 has no tomllib: the trainer config falls back to tomli (run in a child without tomllib)."""
    pytest.importorskip("tomli")
    code = (
        "import sys; sys.modules['tomllib'] = None\n"
        "from rcps_train import config\n"
        "assert config.tomllib.__name__ == 'tomli', config.tomllib\n"
        "assert config.load_config('demo', ['loss.alpha=0.2'])['loss']['alpha'] == 0.2\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
