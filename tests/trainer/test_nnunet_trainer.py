"""nnUNetTrainerRCPS on the tiny dataset, constructed directly: the unlabeled terms change the weights, a resumed
run matches the uninterrupted one, checkpoints keep nnU-Net's keys and load into nnU-Net's own network."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import random

os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnunetv2 reads it at import

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("nnunetv2")

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

from rcps_nnunet.trainer import SETTINGS_FILE, nnUNetTrainerRCPS  # noqa: E402
from tests.trainer.nnunet_data import DATASET, nnunet_folders  # noqa: E402

CONFIGURATION = "3d_fullres"


class Interrupted(Exception):
    """Stands for a killed job."""


class SeededTrainer(nnUNetTrainerRCPS):
    """Two epochs of 2 steps; every epoch re-seeds the global generators (nnU-Net's augmentation draws from them and
    its checkpoints do not store them), so an interrupted and an uninterrupted run see the same patches."""

    stop_after_epochs: int | None = None

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 2
        self.save_every = 1

    def on_train_epoch_start(self):
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(1000 + self.current_epoch)
        super().on_train_epoch_start()

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.current_epoch == self.stop_after_epochs:
            raise Interrupted


@pytest.fixture
def nnunet_env(tmp_path_factory, tmp_path):
    with nnunet_folders(tmp_path_factory, tmp_path / "results", {"num_negatives": 50}) as folders:
        yield folders


def _trainer(folders, resuming: bool = False, cls=SeededTrainer):
    preprocessed = folders["nnUNet_preprocessed"] / DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = resuming
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    return cls(plans, CONFIGURATION, 0, dataset_json, device=torch.device("cpu"))


def _parameters(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*trainer.network.parameters(), *trainer.projector.parameters()]]


def test_unlabeled_terms_change_the_weights(nnunet_env):
    trainer = _trainer(nnunet_env)
    trainer.on_train_start()
    trainer.current_epoch = trainer.num_epochs  # ramp-up weight 1
    batch = next(trainer.dataloader_train)
    trainer.dataloader_unlabeled = itertools.repeat(next(trainer.dataloader_unlabeled))
    unlabeled = next(trainer.dataloader_unlabeled)["data"]

    # The unlabeled terms alone reach the network's weights.
    target = batch["target"]
    terms = trainer.compute_terms(batch["data"], target, unlabeled)
    unlabeled_loss = terms["urp_u"] + terms["cr_u"] + terms["bc_u"]
    grads = torch.autograd.grad(unlabeled_loss, list(trainer.network.parameters()), allow_unused=True)
    assert sum(float(g.norm()) for g in grads if g is not None) > 0

    start = (
        copy.deepcopy(trainer.network.state_dict()),
        copy.deepcopy(trainer.projector.state_dict()),
        copy.deepcopy(trainer.optimizer.state_dict()),
        trainer.view_generator.get_state(),
    )

    def step(settings) -> list[torch.Tensor]:
        trainer.network.load_state_dict(start[0])
        trainer.projector.load_state_dict(start[1])
        trainer.optimizer.load_state_dict(start[2])
        trainer.view_generator.set_state(start[3])
        trainer.rcps_settings = settings
        trainer.train_step(batch)
        return _parameters(trainer)

    with_unlabeled = step(trainer.rcps_settings)
    supervised_only = step(dataclasses.replace(trainer.rcps_settings, alpha=0.0, beta=0.0))
    network_count = len(list(trainer.network.parameters()))
    differences = [float((a - b).abs().max()) for a, b in zip(with_unlabeled, supervised_only)][:network_count]
    assert max(differences) > 0, "the unlabeled losses did not change a single network weight"
    trainer.on_train_end()


def test_resume_matches_the_uninterrupted_run(nnunet_env, tmp_path):
    torch.manual_seed(0)
    uninterrupted = _trainer(nnunet_env)
    uninterrupted.run_training()

    os.environ["nnUNet_results"] = str(tmp_path / "interrupted")
    (tmp_path / "interrupted").mkdir()
    torch.manual_seed(0)
    interrupted = _trainer(nnunet_env)
    interrupted.stop_after_epochs = 1
    with pytest.raises(Interrupted):
        interrupted.run_training()
    interrupted.dataloader_unlabeled = interrupted.dataloader_train = interrupted.dataloader_val = None

    # --c: nnU-Net builds the trainer with continue_training and loads checkpoint_latest.pth.
    resumed = _trainer(nnunet_env, resuming=True)
    resumed.load_checkpoint(os.path.join(resumed.output_folder, "checkpoint_latest.pth"))
    assert resumed.current_epoch == 1
    resumed.run_training()

    for a, b in zip(_parameters(uninterrupted), _parameters(resumed)):
        assert torch.equal(a, b)
    assert uninterrupted.view_generator.get_state().equal(resumed.view_generator.get_state())
    for name in ("rcps_urp_u", "rcps_bc_u", "train_losses", "val_losses"):
        assert uninterrupted.logger.get_value(name, None) == resumed.logger.get_value(name, None)


def test_resume_reads_the_run_settings_and_refuses_contradictions(nnunet_env, monkeypatch):
    monkeypatch.setenv("RCPS_NNUNET_SETTINGS", json.dumps({"num_negatives": 50, "project_dim": 16}))
    first = _trainer(nnunet_env)
    first.on_train_start()
    first.on_train_end()
    with open(os.path.join(first.output_folder, SETTINGS_FILE)) as file:
        saved = json.load(file)
    assert saved["project_dim"] == 16

    monkeypatch.delenv("RCPS_NNUNET_SETTINGS")
    resumed = _trainer(nnunet_env, resuming=True)
    assert resumed.rcps_settings.project_dim == 16
    resumed.load_checkpoint(os.path.join(resumed.output_folder, "checkpoint_final.pth"))

    monkeypatch.setenv("RCPS_NNUNET_SETTINGS", json.dumps({"project_dim": 32}))
    with pytest.raises(ValueError, match=r"project_dim=32 \(the run used 16\)"):
        _trainer(nnunet_env, resuming=True)


def test_checkpoint_keeps_nnunet_keys_and_loads_into_nnunet_network(nnunet_env, tmp_path):
    trainer = _trainer(nnunet_env)
    trainer.initialize()
    ours, stock = tmp_path / "ours.pth", tmp_path / "stock.pth"
    trainer.save_checkpoint(str(ours))
    nnUNetTrainer.save_checkpoint(trainer, str(stock))
    checkpoint = torch.load(ours, weights_only=False)
    assert set(checkpoint) - {"rcps"} == set(torch.load(stock, weights_only=False))
    assert set(checkpoint["rcps"]) == {"settings", "projector", "view_generator", "negative_generator"}

    network = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager,
        trainer.configuration_manager,
        trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(checkpoint["network_weights"])  # strict: no projection-head keys
