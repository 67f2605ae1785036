"""Attention for training on CPU: the plain softmax path, with its dropout mask drawn about 10x faster.

With dropout on, CPU `scaled_dot_product_attention` takes its math path, and the dropout there draws one
float Bernoulli per attention score: ~80 ms per layer for [8, 12, 256, 256] on one core, more than the
softmax and both matmuls together (and paid twice under gradient checkpointing). Here the keep-mask comes
from 16-bit slices of full-range int64 random words of the same global generator, so seeding,
checkpoint replay and resume behave as before:

    P(drop) = p' = round(p · 2^16) / 2^16,   kept scores scaled by 1 / (1 − p')   (expectation unchanged)

Autograd keeps that bool mask rather than a float noise tensor; the 1 / (1 − p') scale is applied to the
small [B, h, L, d] output, and a bool attention mask is made additive on its broadcast shape. On other devices, or without dropout,
torch's SDPA (fused kernels) runs unchanged. `use_fast_cpu_attention` switches a HF model to it; the
enhanced decoder calls `attention` directly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: The name this attention is registered under in transformers' AttentionInterface.
ATTN_IMPLEMENTATION = "dupmae_cpu_dropout"
_LEVELS = 1 << 16  # dropout probability resolution


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """Bool [shape]: True with probability 1 − p' (p' = p rounded to 1/2^16), from the global generator."""
    n = math.prod(shape)
    if round(p * _LEVELS) >= _LEVELS:  # the threshold would not fit in int16
        return torch.zeros(shape, dtype=torch.bool, device=device)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device)
    words.random_(torch.iinfo(torch.int64).min, None)  # all 64 bits uniform: four uniform int16 per word
    threshold = round(p * _LEVELS) - _LEVELS // 2  # int16 values below it are dropped: p' of them
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


def dropout_probability(p: float) -> float:
    """The drop probability `keep_mask` realizes for p."""
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
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # [B, h, Lq, Lk]; matmul saves q, k, not this
    if mask is not None:
        if mask.dtype == torch.bool:  # made additive on the small broadcast shape, not on [B, h, Lq, Lk]
            mask = torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        scores.add_(mask)
    probs = torch.softmax(scores, dim=-1)
    dropped = torch.where(keep_mask(probs.shape, dropout_p, probs.device), probs, 0.0)  # autograd keeps the bool
    return torch.matmul(dropped, value) * (1.0 / (1.0 - dropout_probability(dropout_p)))


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
