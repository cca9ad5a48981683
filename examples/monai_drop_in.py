"""rcps_kernels inside a MONAI training step: MetaTensor inputs, a MONAI network, MONAI's Dice+CE loss.

A MONAI pipeline hands the network ``MetaTensor`` batches (tensors carrying an affine and other metadata), and
the network's outputs are MetaTensors too. The RCPS losses take them as they are, also under
``torch.compile(fullgraph=True)``, and return plain tensors (metadata means nothing to a loss value).

The step is RCPS's semi-supervised one, shrunk: each labeled and unlabeled image is seen un-augmented and in two
intensity-augmented views (voxel-aligned, so the same voxel is a positive pair); the un-augmented predictions are
the teachers. MONAI's UNet gives a feature map that feeds a segmentation head and a projection head.

    python examples/monai_drop_in.py [--steps 5] [--compile] [--backend auto]
"""

from __future__ import annotations

import argparse
import functools

import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandGaussianNoise, RandScaleIntensity
from torch import nn

import rcps_kernels as rk


class UNetWithProjection(nn.Module):
    """A MONAI UNet whose last feature map feeds a segmentation head and a projection head (RCPS's two outputs)."""

    def __init__(self, num_classes: int = 2, feature_channels: int = 16, project_dim: int = 16):
        super().__init__()
        self.backbone = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=feature_channels,
            channels=(8, 16, 32),
            strides=(2, 2),
            num_res_units=1,
        )
        self.seg_head = nn.Conv3d(feature_channels, num_classes, kernel_size=1)
        self.project_head = nn.Sequential(
            nn.Conv3d(feature_channels, feature_channels, kernel_size=1),
            nn.ReLU(),
            nn.Conv3d(feature_channels, project_dim, kernel_size=1),
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(image)
        return self.seg_head(features), self.project_head(features)


def synthetic_batch(batch: int, size: int, generator: torch.Generator) -> tuple[MetaTensor, MetaTensor, MetaTensor]:
    """Labeled images, their labels and unlabeled images as MetaTensors with a 0.8 x 0.8 x 2.5 mm affine, as a
    MONAI ``LoadImaged`` pipeline yields them: a bright ball on noise."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0]))

    def images(count):
        centres = size / 2 + (torch.rand(count, 3, 1, 1, 1, generator=generator) - 0.5) * size / 3
        labels = (((grid - centres) ** 2).sum(1, keepdim=True) < (size / 4) ** 2).float()
        noisy = labels + 0.5 * torch.randn(labels.shape, generator=generator)
        return MetaTensor(noisy, affine=affine), MetaTensor(labels, affine=affine)

    image_l, label_l = images(batch)
    image_u, _ = images(batch)
    return image_l, label_l, image_u


def intensity_views(image: MetaTensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two voxel-aligned views of a batch from MONAI's intensity transforms (per image, channel first)."""
    views = []
    for offset in (0, 1):
        augment = Compose([RandGaussianNoise(prob=1.0, std=0.1), RandScaleIntensity(factors=0.2, prob=1.0)])
        augment.set_random_state(seed + offset)
        views.append(torch.stack([augment(item) for item in image]))
    return views[0], views[1]


def rcps_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, losses: dict, seed: int) -> dict:
    """One semi-supervised step: L_seg (MONAI Dice+CE) + L_urp + L_cr + the bidirectional voxel InfoNCE."""
    image_l, label_l, image_u = batch
    inputs = [image_l, *intensity_views(image_l, seed), image_u, *intensity_views(image_u, seed + 2)]
    logits, projections = model(torch.cat(inputs))
    logits, projections = logits.split(len(image_l)), projections.split(len(image_l))
    terms = {"seg": losses["seg"](logits[0], label_l)}
    for name, first in (("l", 0), ("u", 3)):
        teacher = logits[first].detach()  # the un-augmented view's prediction, no gradient
        terms[f"urp_{name}"], terms[f"cr_{name}"] = losses["pseudo"](logits[first + 1], logits[first + 2], teacher)
        other = 3 - first  # negatives: the other image's un-augmented projections
        terms[f"bc_{name}"] = losses["infonce"](
            projections[first + 1], projections[first + 2], projections[other], teacher, logits[other].detach()
        )
    loss = terms["seg"] + 0.1 * sum(value for key, value in terms.items() if key != "seg")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss, **terms}


def main(argv: list[str] | None = None) -> list[dict]:
    """Train a few steps; returns every step's loss terms (tensors)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=24, help="edge of the cubic images")
    parser.add_argument("--backend", default="auto", help='rcps_kernels backend ("auto", "cpu", "reference", ...)')
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the two RCPS losses")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = UNetWithProjection()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = {
        "seg": DiceCELoss(to_onehot_y=True, softmax=True),
        "pseudo": functools.partial(rk.pseudo_supervision_losses, temperature=0.5, backend=args.backend),
        "infonce": functools.partial(
            rk.bidirectional_voxel_infonce, num_negatives=64, temperature=0.1, backend=args.backend
        ),
    }
    if args.compile:
        losses["pseudo"] = torch.compile(losses["pseudo"], fullgraph=True)
        losses["infonce"] = torch.compile(losses["infonce"], fullgraph=True)
    history = []
    for step in range(args.steps):
        terms = rcps_step(model, optimizer, synthetic_batch(2, args.size, generator), losses, seed=step * 4)
        history.append(terms)
        print(
            f"step {step}: "
            + ", ".join(f"{key} {value.item():.4f}" for key, value in terms.items())
            + f"  (L_bc is a {type(terms['bc_u']).__name__})"
        )
    return history


if __name__ == "__main__":
    main()
