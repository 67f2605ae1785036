"""The tensor operations of DupMAE's sparse half, shared by `common.representation` (the `Encoder`) and
`common.st_modules` (sentence-transformers' `DupMAESparsePooling`), so that both compute the same vector and
neither module imports the other for them: `ordinary_tokens` (the positions μ pools over), `sparse_half`
(μ -> the scored vector) and `sparsify` (a document's top-k entries).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ordinary_tokens(attention_mask: Tensor) -> Tensor:
    """[B, L] bool: attended positions minus [CLS] (position 0) and each row's last attended one ([SEP])."""
    ordinary = attention_mask.bool().clone()  # [B, L]
    last = attention_mask.sum(1).long() - 1  # [B]
    ordinary[torch.arange(len(last), device=last.device), last.clamp(min=0)] = False
    ordinary[:, 0] = False
    return ordinary


def sparse_half(pooled: Tensor, attention_mask: Tensor, values: str, normalize: bool) -> Tensor:
    """The sparse half from the max-pooled vocabulary vector μ [B, V]: softmax(μ) for values "probs", then
    L2-normalized with `normalize`; a text without ordinary tokens (the empty string) gets a zero vector."""
    if values == "probs":
        pooled = torch.softmax(pooled.float(), dim=-1).to(pooled.dtype)
    if normalize:
        pooled = F.normalize(pooled, dim=-1)
    return pooled.masked_fill(~ordinary_tokens(attention_mask).any(1, keepdim=True), 0.0)


def sparsify(vocab: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row: (indices [B, k], values [B, k]); k is capped at V."""
    values, indices = torch.topk(vocab, min(k, vocab.shape[-1]), dim=-1)
    return indices, values
