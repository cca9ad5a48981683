"""The authors' contrastive-loss algorithm, reimplemented as the baseline of the benchmarks.

Same maths as RCPS's official NegativeSamplingPixelContrastiveLoss (docs/design.md section 2.6
lists where we differ from it): a pool x anchor float mask of "different class" times the
pool confidence, top-K along the pool axis per anchor, a K x anchors x C gather of negatives and
cosine similarities on the expanded tensors; called under torch.utils.checkpoint as in the
official training step. Written from that description, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _rows(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _official_loss(
    anchor, positive, pool, anchor_logits, pool_logits, num_negatives: int, temperature: float
) -> torch.Tensor:
    z1 = F.normalize(_rows(anchor), dim=-1)
    z2 = F.normalize(_rows(positive), dim=-1)
    zn = F.normalize(_rows(pool), dim=-1)
    anchor_class = torch.softmax(_rows(anchor_logits), dim=1).max(dim=1).indices
    pool_conf, pool_class = torch.softmax(_rows(pool_logits), dim=1).max(dim=1)

    positive_sim = F.cosine_similarity(z1, z2, dim=-1) / temperature  # (N,)
    # (M, N) float masks: rows are pool voxels, columns anchors.
    different = (pool_class.unsqueeze(1) != anchor_class.unsqueeze(0)).float()
    masked_conf = different * pool_conf.unsqueeze(1).expand_as(different)
    idx = torch.topk(masked_conf, num_negatives, dim=0).indices  # (K, N)
    gathered = zn[idx]  # (K, N, C)

    def direction(z: torch.Tensor) -> torch.Tensor:
        negative_sim = F.cosine_similarity(z.unsqueeze(0).expand_as(gathered), gathered, dim=-1)
        denominator = positive_sim.exp() + (negative_sim / temperature).exp().sum(dim=0) + 1e-8
        return -torch.log(positive_sim.exp() / denominator).mean()

    return direction(z1) + direction(z2)


def official_infonce(
    anchor, positive, pool, anchor_logits, pool_logits, num_negatives: int = 400, temperature: float = 0.1
) -> torch.Tensor:
    """Official-algorithm L_bc (bidirectional), under activation checkpointing like the authors'."""
    return checkpoint(
        _official_loss,
        anchor,
        positive,
        pool,
        anchor_logits,
        pool_logits,
        num_negatives,
        temperature,
        use_reentrant=False,
    )
