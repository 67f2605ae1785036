"""DupMAE's vocabulary vector μ: the MLM head's scores max-pooled over a text's tokens, memory-bounded.

    z_i = W t_i + b  ∈ R^V  for each kept token i (t_i = the MLM head's transform of h_i)
    μ   = max_i z_i  ∈ R^V                                     (element-wise over the kept tokens)

Pre-training's OT decoding trains μ with a bag-of-words loss (`pretrain.bow_loss`); the retrieval
representation's sparse half is μ (`common.representation`). One implementation serves both.

A plain implementation keeps the [B, L, V] scores for backward (1 GB in bf16 at B=32, L=512, V=30522).
The max only routes gradient to one token per (sample, vocabulary entry), so `_VocabMaxPool` computes the
scores in vocabulary chunks, keeps only the arg-max token index [B, V], and in backward sends
∂L/∂μ[b, v] to t_{b, argmax} and W[v] by gathers / index_add over [B, V, H] slices: O(B·V·H) instead of
the O(B·L·V·H) of a dense backward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

#: Elements of the [B, chunk, H] gradient slices materialized at once in backward.
_BACKWARD_SLICE_ELEMENTS = 1 << 24


class _VocabMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int) -> Tensor:
        batch, length, width = hidden.shape
        vocab = weight.shape[0]
        flat = hidden.reshape(batch * length, width)  # [B·L, H]
        pooled = torch.empty(batch, vocab, dtype=hidden.dtype, device=hidden.device)  # [B, V]
        argmax = torch.empty(batch, vocab, dtype=torch.long, device=hidden.device)  # [B, V]
        for start in range(0, vocab, chunk_size):
            scores = (weight[start:start + chunk_size] @ flat.T).view(-1, batch, length)  # [c, B, L]
            values, indices = scores.max(dim=-1)  # [c, B]: reduce along the contiguous axis
            pooled[:, start:start + chunk_size] = values.T
            argmax[:, start:start + chunk_size] = indices.T
        if bias is not None:  # the bias does not move the arg-max: add it once after pooling
            pooled += bias
        ctx.save_for_backward(hidden, weight, argmax)
        ctx.has_bias = bias is not None
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: Tensor):
        hidden, weight, argmax = ctx.saved_tensors
        batch, length, width = hidden.shape
        flat = hidden.reshape(batch * length, width)  # [B·L, H]
        rows = argmax + torch.arange(batch, device=argmax.device)[:, None] * length  # [B, V] rows of `flat`
        grad_pooled = grad_pooled.to(hidden.dtype)
        if _use_sparse(hidden):
            grad_flat, grad_weight = _route_sparse(grad_pooled, rows, flat, weight)
        else:
            grad_flat, grad_weight = _route_sliced(grad_pooled, rows, flat, weight)
        grad_bias = grad_pooled.sum(0) if ctx.has_bias else None
        return grad_flat.view(batch, length, width), grad_weight, grad_bias, None


def _use_sparse(hidden: Tensor) -> bool:
    """CPU fp32/fp64: one sparse-dense product each way; elsewhere (CUDA, bf16) bounded dense slices."""
    return hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.float64)


def _route_sparse(grad: Tensor, rows: Tensor, flat: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """S [B·L, V] holds grad[b, v] at (rows[b, v], v): ∂/∂flat = S W, ∂/∂W = Sᵀ flat (B·V·H MACs)."""
    batch, vocab = grad.shape
    vocab_ids = torch.arange(vocab, device=rows.device).repeat(batch)  # [B·V]
    values = grad.reshape(-1)
    to_rows = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), vocab_ids]), values, (flat.shape[0], vocab),
                                      check_invariants=False)
    to_vocab = torch.sparse_coo_tensor(torch.stack([vocab_ids, rows.reshape(-1)]), values, (vocab, flat.shape[0]),
                                       check_invariants=False)
    return torch.sparse.mm(to_rows, weight), torch.sparse.mm(to_vocab, flat)


def _route_sliced(grad: Tensor, rows: Tensor, flat: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The same products by gathers and index_add over [B, c, H] vocabulary slices (fp32 accumulation)."""
    batch, vocab = grad.shape
    width = flat.shape[1]
    grad_flat = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    grad_weight = torch.empty_like(weight)
    step = max(1, _BACKWARD_SLICE_ELEMENTS // max(1, batch * width))
    for start in range(0, vocab, step):
        r = rows[:, start:start + step]  # [B, c]
        g = grad[:, start:start + step]  # [B, c]
        grad_weight[start:start + step] = torch.einsum("bc,bch->ch", g, flat[r])
        contrib = g[:, :, None] * weight[start:start + step][None]  # [B, c, H]
        grad_flat.index_add_(0, r.reshape(-1), contrib.reshape(-1, width).float())
    return grad_flat.to(flat.dtype), grad_weight


def vocab_max_pool(hidden: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor,
                   chunk_size: int = 4096, transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """μ [B, V] = max over tokens with keep[b, i] of (transform(hidden[b, i]) @ weight.T + bias).

    hidden [B, L, H], weight [V, H], bias [V] or None, keep [B, L] bool, transform = the MLM head's
    hidden-to-hidden part (dense, act, LayerNorm) or None. A row with no kept token gets μ = 0 (its loss
    must be masked by the caller). Kept tokens are first packed to the front so dropped ones cost no FLOPs.
    """
    keep = keep.bool()
    counts = keep.sum(1)  # [B]
    width = int(counts.max()) if keep.numel() else 0
    if width == 0:
        return hidden.new_zeros(hidden.shape[0], weight.shape[0])
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first
    # Slots past a row's count repeat its first kept token: the max is unchanged and no -inf mask is needed
    # (the gradient of a repeat flows back to the same token through the gather).
    order = torch.where(torch.arange(width, device=keep.device)[None] < counts[:, None], order, order[:, :1])
    packed = hidden.gather(1, order[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, width, H]
    if transform is not None:
        packed = transform(packed)
    pooled = _VocabMaxPool.apply(packed, weight, bias, chunk_size)
    return pooled.masked_fill((counts == 0)[:, None], 0.0)


def split_mlm_head(mlm: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Linear]:
    """(hidden -> transformed hidden, vocabulary projection) of a BERT-style or RoBERTa-style MLM head."""
    projection = mlm.get_output_embeddings()
    predictions = getattr(getattr(mlm, "cls", None), "predictions", None)
    if predictions is not None and hasattr(predictions, "transform"):  # BERT family
        return predictions.transform, projection
    lm_head = getattr(mlm, "lm_head", None)
    if lm_head is not None and hasattr(lm_head, "dense") and hasattr(lm_head, "layer_norm"):  # RoBERTa family
        from transformers.activations import gelu

        return lambda x: lm_head.layer_norm(gelu(lm_head.dense(x))), projection
    raise ValueError(f"{type(mlm).__name__}: unsupported MLM head (expected BERT `cls.predictions` or RoBERTa "
                     "`lm_head`)")
