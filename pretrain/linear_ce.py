"""Weighted cross-entropy through the vocabulary projection without keeping [N, V] logits for backward.

    L = Σ_n w_n · CE_n,   CE_n = logsumexp_v(z_nv) − z_n,y_n,   z = h Wᵀ + b,   h [N, H], W [V, H], b [V]

The row weights w fold the loss weights and normalizers in (w_n = mlm_weight / #masked for encoder rows,
decoder_weight / #targets for decoder rows), so the encoder-MLM and decoder terms share one call and one
fp32 ∂L/∂W accumulator. The gradient is known in the forward pass,
∂L/∂z_n = w_n·(softmax(z_n) − onehot(y_n)), so each chunk of rows computes its logits (fp32 for the
softmax whatever the weights' dtype), the loss and the gradients w.r.t. h, W and b, then frees the logits;
backward only scales the stored gradients by the incoming scalar. Peak memory is one [chunk, V] block instead
of the [N, V] logits and softmax that autograd would keep (the idea of Liger-Kernel's fused linear
cross-entropy); FLOPs are the plain path's.

Mixed precision: the stored gradients are formed at loss scale 1, where the per-row factor w_n / Σ_v e^{z_nv}
is about 1e-8 (w_n = 1/#rows, a near-flat softmax over 30k words), below fp16's smallest subnormal. So they
are kept in fp32 (∂L/∂h [N, H] and ∂L/∂W, ∂L/∂b), multiplied by the incoming loss scale in fp32, and only then
cast to the model's dtype; the half-precision ∂L/∂W product runs on row factors brought near fp16's top by a
power of two (exact), never on the raw factors.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, row_weights: Tensor,
                chunk_size: int, with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        n_rows = hidden.shape[0]
        row_weights = row_weights.float()
        per_row = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # CE_n
        correct = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)
        if with_grad:
            accumulate = torch.promote_types(weight.dtype, torch.float32)  # fp32 for bf16/fp16 models
            grad_hidden = torch.empty(hidden.shape, dtype=accumulate, device=hidden.device)  # [N, H]
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, H]
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)  # [V]
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            h, y, w = hidden[rows], labels[rows], row_weights[rows]  # [n, H], [n], [n]
            logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()  # [n, V]
            target = logits.gather(1, y[:, None]).squeeze(1)  # [n]
            row_max, predicted = logits.max(-1)  # [n], [n]
            correct[rows] = predicted == y
            probs = logits.sub_(row_max[:, None]).exp_()  # unnormalized softmax, in place: one [n, V] buffer
            total = probs.sum(-1)  # [n]
            per_row[rows] = row_max + total.log() - target
            if with_grad:
                # w·(probs / total − onehot): the scaling and the one-hot part are applied to the small [n, H]
                # and [V] operands instead of another pass over [n, V].
                scale = w / total  # [n] fp32, ~1e-8: never cast to the model's dtype
                g = probs.to(weight.dtype)  # [n, V], entries in [0, 1]
                onehot_part = w[:, None] * weight[y].to(accumulate)  # [n, H]
                grad_hidden[rows] = (g @ weight).to(accumulate) * scale[:, None] - onehot_part
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.T, h * scale[:, None])
                else:  # bf16/fp16 product, accumulated in fp32 across chunks
                    grad_weight += _half_product(g, h, scale)
                grad_weight.index_add_(0, y, h.float() * w[:, None], alpha=-1.0)
                grad_bias += scale @ probs
                grad_bias.index_add_(0, y, w, alpha=-1.0)
        ctx.has_bias = bias is not None
        ctx.dtype = weight.dtype
        ctx.used = False
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(per_row, correct)
        return (row_weights * per_row).sum(), per_row, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_per_row: Tensor, _grad_correct: Tensor):
        if ctx.used:  # the stored gradients are scaled in place (no extra [V, H] copy): one backward only
            raise RuntimeError("linear_cross_entropy does not support a second backward through the same graph")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.float()  # the loss scale (2^16 under fp16) multiplies in fp32, then the cast
        grad_h = grad_hidden.mul_(scale).to(ctx.dtype)
        grad_w = grad_weight.mul_(scale).to(ctx.dtype)
        grad_b = grad_bias.mul_(scale).to(ctx.dtype) if ctx.has_bias else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _half_product(g: Tensor, h: Tensor, scale: Tensor) -> Tensor:
    """gᵀ (scale ⊙ h) in fp32 from a half-precision product: g [n, V] in [0, 1], h [n, H], scale [n] fp32.

    The rows h_n·scale_n are multiplied by a power of two c (exact) so that their largest entry is at most
    2^15 / n: no sum of n products with g ≤ 1 can pass fp16's 65504, and entries down to ~n·2^-29 of the
    largest stay normal numbers (a near-flat softmax row is ~1/V of a peaked one). The result is divided by c.
    """
    rows = h.float() * scale[:, None]  # [n, H]
    exponent = 15 - torch.ceil(torch.log2(h.shape[0] * rows.abs().max()))  # +inf for all-zero rows
    c = torch.exp2(exponent.clamp(-126, 126))
    return (g.T @ (rows * c).to(h.dtype)).float() / c  # [V, H]


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         row_weights: Tensor, chunk_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(Σ_n w_n·CE_n [fp32, 0-dim, differentiable], CE_n [N] fp32 detached, argmax == label [N] bool).

    hidden [N, H] (rows to predict, already through the head's transform), weight [V, H], bias [V] or None,
    labels [N] in [0, V) (callers drop ignored positions first), row_weights [N].
    """
    if not hidden.shape[0] == labels.shape[0] == row_weights.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} rows, {labels.shape[0]} labels, "
                         f"{row_weights.shape[0]} row weights")
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, row_weights, chunk_size, with_grad)
