"""``nnUNetTrainerRCPS``: nnU-Net v2's trainer with the RCPS semi-supervised objective (docs/nnunet.md).

The network is nnU-Net's own (``build_network_architecture`` is inherited), so stock prediction loads the weights.
The trainer adds a projection head, fed by a forward hook on the decoder stage at 1/4 resolution, a second data
loader over the preprocessed unlabeled cases, and a ``train_step`` that makes one optimizer update from both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from rcps_train.augment import intensity_view
from rcps_train.losses import TERMS, ramp_weight, total_loss

from .environment import check_nnunet_version
from .loader import UnlabeledDataLoader
from .losses import split_parts, unlabeled_terms
from .network import ProjectionHead, projection_stage, unwrap
from .progress import LOGGED_TERMS, RCPSLocalLogger, epoch_means
from .settings import overrides_from_environment, resolve_settings
from .unlabeled import check_unlabeled_folder, unlabeled_folder

#: Written next to the checkpoints: a resumed run (``--c``) reads its settings from here before building anything.
SETTINGS_FILE = "rcps_settings.json"
#: nnU-Net's gradient-norm clip.
GRAD_CLIP = 12.0


class nnUNetTrainerRCPS(nnUNetTrainer):
    """nnU-Net's trainer plus the RCPS losses on a second stream of unlabeled patches.

    Args:
        plans, configuration, fold, dataset_json, device: as ``nnUNetTrainer``.
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        check_nnunet_version()
        resuming = bool(plans.get("continue_training", False))  # nnUNetTrainer pops the key
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.is_cascaded:
            kind = "region-based" if self.label_manager.has_regions else "a cascade stage"
            raise ValueError(
                f"nnUNetTrainerRCPS needs a softmax, non-cascade configuration; {configuration!r} of "
                f"{self.plans_manager.dataset_name} is {kind}"
            )
        self.rcps_settings = resolve_settings(overrides_from_environment(), self._saved_settings(resuming))
        self.projector: nn.Module | None = None
        self.dataloader_unlabeled = None
        self._stage_features: torch.Tensor | None = None
        self._capture_stage = False
        seed = self.rcps_settings.seed * 1009 + self.local_rank
        self.view_generator = torch.Generator().manual_seed(seed)
        self.negative_generator = torch.Generator().manual_seed(seed + 1)
        # Declares the RCPS terms (nnU-Net's logger refuses undeclared keys) and plots them.
        self.logger.local_logger = RCPSLocalLogger()

    def _saved_settings(self, resuming: bool) -> dict | None:
        path = Path(self.output_folder) / SETTINGS_FILE
        return json.loads(path.read_text()) if resuming and path.is_file() else None

    # ---- set-up -------------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule over the network and the projection head (built here, with its hook)."""
        network = unwrap(self.network)
        stage, channels = projection_stage(network, self.configuration_manager.pool_op_kernel_sizes)
        stage.register_forward_hook(self._keep_stage_features)
        self.projector = ProjectionHead(
            len(self.configuration_manager.patch_size), channels, self.rcps_settings.project_dim
        ).to(self.device)
        parameters = [*self.network.parameters(), *self.projector.parameters()]
        optimizer = torch.optim.SGD(
            parameters, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _keep_stage_features(self, module, inputs, output) -> None:
        if self._capture_stage:
            self._stage_features = output

    def initialize(self):
        super().initialize()
        if self.is_ddp:
            # Its own reducer: the network's DDP wrapper does not see the head's parameters.
            self.projector = DDP(self.projector, device_ids=[self.local_rank])

    def get_dataloaders(self):
        """nnU-Net's labeled loaders, plus the unlabeled one (``self.dataloader_unlabeled``)."""
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        manager = self.plans_manager
        check_unlabeled_folder(folder, manager.plans, self.configuration_name, manager.dataset_name)
        loaders = super().get_dataloaders()
        self.dataloader_unlabeled = self._unlabeled_augmenter(folder)
        return loaders

    def _unlabeled_augmenter(self, folder: Path):
        """Random unlabeled patches through nnU-Net's training augmentation (its targets are not used)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        patch_size = self.configuration_manager.patch_size
        transforms = self.get_training_transforms(
            patch_size,
            rotation,
            None,
            mirror_axes,
            dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
        )
        dataset = infer_dataset_class(str(folder))(str(folder))
        batch_size = self.rcps_settings.unlabeled_batch_size or self.batch_size
        loader = UnlabeledDataLoader(
            dataset, batch_size, initial_patch_size, patch_size, self.label_manager, transforms=transforms
        )
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(
            loader,
            None,
            processes,
            num_cached=max(6, processes // 2),
            seeds=None,
            pin_memory=self.device.type == "cuda",
            wait_time=0.002,
        )

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            (Path(self.output_folder) / SETTINGS_FILE).write_text(json.dumps(self.rcps_settings.as_dict(), indent=2))
        self.print_to_log_file(f"RCPS settings: {self.rcps_settings.as_dict()}")

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    # ---- one step -----------------------------------------------------------------------------------------------

    def ramp(self) -> float:
        """The sigmoid ramp-up weight of the current epoch."""
        return ramp_weight(self.current_epoch, self.rcps_settings.rampup_epochs or self.num_epochs)

    def compute_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every RCPS term of one step: one forward over both images and two intensity views of each.

        Args:
            data: labeled patches ``(B_l, C, *S)`` on the device.
            target: nnU-Net's target (a list per deep-supervision level, or one tensor).
            unlabeled: unlabeled patches ``(B_u, C, *S)`` on the device.

        Returns:
            ``seg`` (nnU-Net's Dice+CE on the plain labeled view, with its deep supervision) and the terms of
            :func:`rcps_nnunet.losses.unlabeled_terms`.
        """
        views = [intensity_view(x, self.view_generator) for x in (data, data, unlabeled, unlabeled)]
        inputs = torch.cat([data, views[0], views[1], unlabeled, views[2], views[3]])
        sizes = (data.shape[0], unlabeled.shape[0])
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            self._capture_stage = True
            try:
                output = self.network(inputs)
            finally:
                self._capture_stage = False
            features, self._stage_features = self._stage_features, None
            projections = self.projector(features)
            outputs = output if isinstance(output, (list, tuple)) else [output]
            levels = [split_parts(level, *sizes) for level in outputs]
            plain = [parts[0] for parts in levels] if self.enable_deep_supervision else levels[0][0]
            seg = self.loss(plain, target)
        # The RCPS terms run in float32 whatever the forward precision.
        levels = [tuple(part.float() for part in parts) for parts in levels]
        weights = self.loss.weight_factors if self.enable_deep_supervision else (1.0,)
        terms = unlabeled_terms(
            levels, split_parts(projections.float(), *sizes), weights, self.rcps_settings, self.negative_generator
        )
        return {"seg": seg, **terms}

    def train_step(self, batch: dict) -> dict:
        """One optimizer update from a labeled batch (nnU-Net's loader) and the next unlabeled batch."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device, non_blocking=True)
        )
        unlabeled = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.compute_terms(data, target, unlabeled)
        loss = total_loss(terms, self.ramp(), self.rcps_settings.as_dict())
        parameters = [*self.network.parameters(), *self.projector.parameters()]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
            self.optimizer.step()
        values = torch.stack([loss.detach().float(), *(terms[name].detach().float() for name in TERMS)]).cpu()
        return {"loss": values[0].numpy(), **{name: values[i + 1].numpy() for i, name in enumerate(TERMS)}}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        means = epoch_means(train_outputs, TERMS)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {name: float(np.mean([rank[name] for rank in gathered])) for name in means}
        means["ramp"] = self.ramp()
        for name in LOGGED_TERMS:
            self.logger.log(f"rcps_{name}", means[name], self.current_epoch)

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (its keys unchanged) plus ``rcps``: settings, projection head, generator states."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing here; prints nnU-Net's message when disabled
            return
        network = unwrap(self.network)
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "rcps": self._rcps_state(),
        }
        torch.save(checkpoint, filename)

    def _rcps_state(self) -> dict:
        return {
            "settings": self.rcps_settings.as_dict(),
            "projector": unwrap(self.projector).state_dict(),
            "view_generator": self.view_generator.get_state(),
            "negative_generator": self.negative_generator.get_state(),
        }

    def load_checkpoint(self, filename_or_checkpoint: str) -> None:
        """nnU-Net's restore, then the projection head and the generators; the settings must be the run's."""
        super().load_checkpoint(filename_or_checkpoint)
        state = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if "rcps" not in state:
            raise ValueError(f"{filename_or_checkpoint} has no 'rcps' entry: it was not written by nnUNetTrainerRCPS")
        rcps = state["rcps"]
        if rcps["settings"] != self.rcps_settings.as_dict():
            raise ValueError(
                f"{filename_or_checkpoint} was trained with RCPS settings {rcps['settings']}, this trainer has "
                f"{self.rcps_settings.as_dict()}: resume with the run's settings"
            )
        unwrap(self.projector).load_state_dict(rcps["projector"])
        self.view_generator.set_state(rcps["view_generator"].cpu())
        self.negative_generator.set_state(rcps["negative_generator"].cpu())
