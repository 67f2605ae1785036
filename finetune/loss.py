"""InfoNCE over in-batch, hard and (optionally) cross-device negatives.

For query i with passages laid out in groups of G (positive first, then its hard negatives):
    L = -(1/Bq) Σ_i log( exp(s(q_i, p_{o + i·G}) / τ) / Σ_j exp(s(q_i, p_j) / τ) )
where j runs over every passage of the batch (every rank's with cross-device negatives) and o is the index of
this rank's first passage in the gathered list (rank · B · G). References: sentence-transformers
`MultipleNegativesRankingLoss(gather_across_devices=True)`, tevatron `_dist_gather_tensor`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from common.representation import RepresentationConfig


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the gathered tensor and returns this rank's slice.

    So a passage's gradient includes the terms from other ranks' queries, and after DeepSpeed averages parameter
    gradients over ranks, training equals one process with the whole batch and the mean loss.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # [B, ...] -> [W*B, ...]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # [W*B, ...] -> [B, ...]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate every rank's tensor (equal shapes) in rank order; gradients flow back to the owning rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def positive_labels(num_queries: int, group_size: int, offset: int = 0, device=None) -> Tensor:
    """[Bq] index of each query's positive among the passages: offset + i * group_size."""
    return offset + torch.arange(num_queries, device=device) * group_size


#: Temperatures by score kind: cosine scores live in [-1, 1] and need sharpening (sentence-transformers' scale 20);
#: raw dot products (DPR, the official RetroMAE bi-encoder) are already spread over tens to thousands.
COSINE_TEMPERATURE = 0.05
DOT_TEMPERATURE = 1.0


def default_temperature(representation: RepresentationConfig) -> float:
    """0.05 for cosine scores (`normalize`: for dupmae both halves, so the score is cos + w cos), 1.0 for raw dot
    products. A low temperature on raw scores makes the softmax a hard max: a query whose positive already ranks
    first gets no gradient at all."""
    return COSINE_TEMPERATURE if representation.normalize else DOT_TEMPERATURE


def info_nce(scores: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE of scores [Bq, Bp] with positives at labels [Bq]."""
    return F.cross_entropy(scores / temperature, labels)


#: A query whose positive has softmax probability above 1 - this (a loss below about 1e-3) gets almost no gradient.
SATURATED = 1e-3


def learning_share(scores: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Share of queries still learning: ∂L/∂s_i = (softmax(s_i / τ) − onehot) / τ vanishes when the positive's
    probability reaches 1, so this is the fraction with p(positive) < 1 − SATURATED (a too-low temperature on
    raw scores drives it to the share of queries ranked wrong)."""
    p_positive = torch.softmax(scores.float() / temperature, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return (p_positive < 1 - SATURATED).float().mean()
