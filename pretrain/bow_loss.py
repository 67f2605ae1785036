"""OT (ordinary-token) decoding's loss: the max-pooled vocabulary vector μ must predict the block's bag of words.

    L_BoW = − Σ_t w_t · log softmax(μ)[t]                    (w = the block's BoW target, Σ w = 1)

μ comes from `common.vocab_pooling.vocab_max_pool` over the ordinary tokens (see ../shared/DUPMAE.md).
The official code's target (`--objective official`) gives each unique token 1/n instead, n the block's length,
so its weights sum to |unique|/n: `official_bow_weights`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def bow_loss(pooled: Tensor, bow_ids: Tensor, bow_weights: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(mean BoW cross-entropy, mean BoW recall) over the rows with valid[b] (0-dim fp32 tensors).

    pooled [B, V] (μ), bow_ids [B, T] (unique ids, padded), bow_weights [B, T] (target weights, 0 = padding),
    valid [B] bool (rows that had a kept token). log-softmax runs in fp32.
    BoW recall of a row = |top-k(μ) ∩ targets| / k with k = its number of target ids (weight > 0):
    the fraction of the block's unique tokens that the k highest vocabulary scores recover.
    """
    log_probs = torch.log_softmax(pooled.float(), dim=-1)  # [B, V]
    weights = bow_weights.float() * valid[:, None]  # [B, T]
    per_row = -(weights * log_probs.gather(1, bow_ids)).sum(1)  # [B]
    n_rows = valid.sum().clamp(min=1)
    loss = per_row.sum() / n_rows
    with torch.no_grad():
        is_target = bow_weights > 0  # [B, T]
        k = is_target.sum(1)  # [B]
        top = torch.topk(pooled, int(k.max().clamp(min=1)), dim=-1).indices  # [B, kmax]
        target_set = torch.zeros_like(pooled, dtype=torch.int32).scatter_add_(1, bow_ids, is_target.int()) > 0  # [B, V]
        in_top = target_set.gather(1, top) & (torch.arange(top.shape[1], device=top.device)[None] < k[:, None])
        recall = in_top.sum(1).float() / k.clamp(min=1)  # [B]
        recall = (recall * valid).sum() / n_rows
    return loss, recall


def official_bow_weights(bow_weights: Tensor, lengths: Tensor) -> Tensor:
    """The official collator's target: `weight[t] = 1 / len(tokens)` for each unique t (assigned, not added).

    bow_weights [B, T] (> 0 marks a target id; the values are replaced), lengths [B] (n, tokens of the block
    without [CLS]/[SEP]) -> [B, T] float32, each row summing to |unique| / n.
    """
    return (bow_weights > 0).float() / lengths.clamp(min=1)[:, None].float()
