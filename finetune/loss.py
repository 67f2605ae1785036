"""InfoNCE over in-batch, hard and (optionally) cross-device negatives.

For query i with passages laid out in groups of G (positive first, then its hard negatives):
    L = -(1/Bq) Σ_i log( exp(s(q_i, p_{o + i·G}) / τ) / Σ_j exp(s(q_i, p_j) / τ) )
where j runs over every passage of the batch (every rank's with cross-device negatives) and o is the index of
this rank's first passage in the gathered list (rank · B · G). References: sentence-transformers
`MultipleNegativesRankingLoss(gather_across_devices=True)`, tevatron `_dist_gather_tensor`.

The official RetroMAE BiEncoderModel (`--official_cross_device`) gathers queries and passages without gradient
(`gather_detached_but_own`) and takes on every rank the mean over all W·B queries; after the ranks' gradients are
averaged, that is 1/W of the gradient of this mean loss, which the default gives (one process with the whole batch).
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


def gather_detached_but_own(tensor: Tensor) -> Tensor:
    """Every rank's tensor in rank order, the others' without gradient and this rank's in place (the official
    BiEncoderModel's `_dist_gather_tensor`): a rank's loss reaches only its own representations."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def positive_labels(num_queries: int, group_size: int, offset: int = 0, device=None) -> Tensor:
    """[Bq] index of each query's positive among the passages: offset + i * group_size."""
    return offset + torch.arange(num_queries, device=device) * group_size


#: Temperatures by score kind: cosine scores live in [-1, 1] and need sharpening (sentence-transformers' scale 20);
#: raw dot products (DPR, the official RetroMAE bi-encoder) are already spread over tens to thousands.
COSINE_TEMPERATURE = 0.05
DOT_TEMPERATURE = 1.0


def default_temperature(representation: RepresentationConfig) -> float | None:
    """0.05 for cosine scores (`normalize`: for dupmae both halves, so the score is cos + w cos), 1.0 for raw dense
    dot products, None (calibrate on the first batch: `calibrated_temperature`) for dupmae's paper setting: raw MLM
    logits in the sparse half, nothing normalized. That score's scale is the MLM head's: at the first step on SciFact
    train (BM25 negatives, 16 queries x 128 passages) the per-query spread of the scores was 4.6 for a random-init
    BERT (2 layers, 128 wide) and 255 for the packaged MiniLM with a fresh head (scores near 3,900), where 1.0 left
    28-32 % of the queries learning (the ones ranked wrong) and the calibrated temperature (245) all of them.

    A too low temperature on raw scores makes the softmax a hard max: a query whose positive already ranks first
    gets no gradient at all; a too high one flattens it (no fixed value suits both models above)."""
    if representation.normalize:
        return COSINE_TEMPERATURE
    if representation.kind == "dupmae" and representation.sparse_values == "logits" and representation.sparse_weight:
        return None
    return DOT_TEMPERATURE


def calibrated_temperature(scores: Tensor) -> Tensor:
    """Scalar fp32 temperature that gives scores [Bq, Bp] unit spread: the mean over queries (and ranks) of each
    query's standard deviation over its passages; 1.0 if every score is the same."""
    spread = scores.detach().float().std(dim=1).mean()
    if dist.is_initialized() and dist.get_world_size() > 1:  # one temperature on every rank
        dist.all_reduce(spread)
        spread = spread / dist.get_world_size()
    return torch.where(spread > 0, spread, torch.ones_like(spread))


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp32 for bf16/fp16/fp32 scores; fp64 stays fp64 (the parity benchmark's rounding control)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def info_nce(scores: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE of scores [Bq, Bp] with positives at labels [Bq]; the softmax runs in fp32 (under bf16 too)."""
    return F.cross_entropy(at_least_fp32(scores) / temperature, labels)


#: A query whose positive has softmax probability above 1 - this (a loss below about 1e-3) gets almost no gradient.
SATURATED = 1e-3


def learning_share(scores: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Share of queries still learning: ∂L/∂s_i = (softmax(s_i / τ) − onehot) / τ vanishes when the positive's
    probability reaches 1, so this is the fraction with p(positive) < 1 − SATURATED (a too-low temperature on
    raw scores drives it to the share of queries ranked wrong)."""
    p_positive = torch.softmax(scores.float() / temperature, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return (p_positive < 1 - SATURATED).float().mean()
