"""Attention for training on CPU: a fast dropout mask, and no [B, heads, L, L] map kept for backward.

With dropout on, CPU `scaled_dot_product_attention` takes its math path: it draws one float Bernoulli per
attention score and keeps the probabilities, the float noise and the dropped probabilities for backward.
Here the drop-mask comes from 16-bit slices of full-range int64 random words of the same global
generator, so seeding, checkpoint replay and resume behave as before:

    P(drop) = p' = round(p · 2^16) / 2^16,   kept scores scaled by 1 / (1 − p')   (expectation unchanged)

and backward keeps only that bool mask: it recomputes the probabilities from q and k, as flash attention
does. `benchmarks/cpu_attention.py` at [8, 12, 256, 32]: the mask in about a quarter of the time, a quarter
of the bytes saved for backward, forward + backward within a few percent of SDPA's. On other devices, or without dropout, torch's SDPA (fused kernels) runs unchanged.
`use_fast_cpu_attention` switches a HF model to it; the enhanced decoder calls `attention` directly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: The name this attention is registered under in transformers' AttentionInterface.
ATTN_IMPLEMENTATION = "dupmae_cpu_dropout"
_LEVELS = 1 << 16  # dropout probability resolution


def drop_mask(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """Bool [shape]: True (dropped) with probability p' = p rounded to 1/2^16, from the global generator."""
    n = math.prod(shape)
    if round(p * _LEVELS) >= _LEVELS:  # the threshold would not fit in int16
        return torch.ones(shape, dtype=torch.bool, device=device)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device)
    words.random_(torch.iinfo(torch.int64).min, None)  # all 64 bits uniform: four uniform int16 per word
    threshold = round(p * _LEVELS) - _LEVELS // 2  # int16 values below it are dropped: p' of them
    return (words.view(torch.int16)[:n] < threshold).view(shape)


def dropout_probability(p: float) -> float:
    """The drop probability `drop_mask` realizes for p."""
    return round(p * _LEVELS) / _LEVELS


def attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout_p: float = 0.0,
              scaling: float | None = None) -> Tensor:
    """softmax(q kᵀ · scaling + mask) with dropout, times v: [B, h, Lq, d] -> [B, h, Lq, d].

    mask: bool (True = attend) or additive float, broadcastable to [B, h, Lq, Lk]; None = attend everywhere.
    A row that may attend nowhere averages over every position (SDPA would give NaN).
    """
    if dropout_p == 0.0 or dropout_probability(dropout_p) >= 1.0 or query.device.type != "cpu":
        return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                                          scale=scaling)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if mask is not None and mask.dtype == torch.bool:  # made additive on the small broadcast shape
        mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    dropped = drop_mask((*query.shape[:-1], key.shape[-2]), dropout_p, query.device)
    return _DropoutAttention.apply(query, key, value, mask, dropped, scaling,
                                   1.0 / (1.0 - dropout_probability(dropout_p)))


class _DropoutAttention(torch.autograd.Function):
    """Attention with a given drop-mask that saves no [B, h, Lq, Lk] float tensor for backward.

    Saved: q, k, v, the output, the additive mask and the bool drop-mask; backward recomputes the
    probabilities (one matmul and a softmax, as flash attention does) and uses
    Σ_j ∂L/∂P_ij · P_ij = ∂L/∂out_i · out_i for the softmax gradient. Two [B, h, Lq, Lk] buffers at most.
    """

    @staticmethod
    def _probs(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
        scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # [B, h, Lq, Lk]
        if mask is not None:
            scores.add_(mask)
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def forward(ctx, query, key, value, mask, dropped, scaling, keep_scale):
        if mask is not None and mask.requires_grad:
            raise ValueError("cpu_attention: the attention mask must not require grad")
        probs = _DropoutAttention._probs(query, key, mask, scaling).masked_fill_(dropped, 0.0)
        out = torch.matmul(probs, value).mul_(keep_scale)
        ctx.save_for_backward(query, key, value, out, mask, dropped)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, mask, dropped = ctx.saved_tensors
        probs = _DropoutAttention._probs(query, key, mask, ctx.scaling)  # P, before dropout
        grad = grad_out * ctx.keep_scale  # [B, h, Lq, d]
        grad_scores = torch.matmul(grad, value.transpose(-1, -2)).masked_fill_(dropped, 0.0)  # ∂L/∂P
        # P ∘ (∂L/∂P − Σ_j ∂L/∂P_ij P_ij)
        grad_scores.sub_((grad_out * out).sum(-1, keepdim=True)).mul_(probs)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scaling)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), query * ctx.scaling)
        grad_value = torch.matmul(probs.masked_fill_(dropped, 0.0).transpose(-1, -2), grad)
        return grad_query, grad_key, grad_value, None, None, None, None


def _hf_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """transformers' AttentionInterface signature; returns [B, Lq, h, d] as the built-in functions do."""
    if dropout == 0.0 or query.device.type != "cpu":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    return attention(query, key, value, attention_mask, dropout, scaling).transpose(1, 2).contiguous(), None


def use_fast_cpu_attention(model: nn.Module) -> bool:
    """Switch a HF model that uses SDPA to this attention (masks stay SDPA's); False if it uses something else."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return True
