"""Cross-entropy through the vocabulary projection without keeping [N, V] logits for backward.

Loss (summed, not averaged, so callers choose the normalizer):
    L = Σ_n [ logsumexp_v(z_nv) − z_n,y_n ],   z = h Wᵀ + b,   h [N, H], W [V, H], b [V]
Its gradient is known in the forward pass: ∂L/∂z = softmax(z) − onehot(y). So each chunk of rows computes
its logits (fp32 for the softmax whatever the weights' dtype), the loss, and the gradients w.r.t. h, W and b,
and frees the logits (three passes over the [chunk, V] block besides the two matmuls); backward only scales the stored gradients by the incoming scalar. Peak memory is
one [chunk, V] block instead of the [N, V] logits plus their softmax that autograd would keep
(same idea as Liger-Kernel's fused linear cross-entropy). FLOPs are those of the plain path.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int,
                with_grad: bool) -> tuple[Tensor, Tensor]:
        n_rows = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if with_grad else None
        for start in range(0, n_rows, chunk_size):
            h = hidden[start:start + chunk_size]  # [n, H]
            y = labels[start:start + chunk_size]  # [n]
            logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()  # [n, V]
            target = logits.gather(1, y[:, None]).squeeze(1)  # [n]
            row_max, predicted = logits.max(-1)  # [n], [n]
            correct += (predicted == y).sum()
            probs = logits.sub_(row_max[:, None]).exp_()  # unnormalized softmax, in place: one [n, V] buffer
            total = probs.sum(-1)  # [n]
            loss += (row_max + total.log() - target).sum()
            if with_grad:
                # ∂L/∂z = probs / total − onehot(y); the 1/total scaling and the one-hot part are applied to the
                # small [n, H] / [V] operands instead of another pass over [n, V].
                inv = total.reciprocal()  # [n]
                g = probs.to(weight.dtype)  # [n, V]
                grad_hidden[start:start + chunk_size] = (g @ weight) * inv[:, None].to(weight.dtype) - weight[y]
                scaled = h * inv[:, None].to(h.dtype)  # [n, H]
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.T, scaled)
                else:  # bf16/fp16 product, accumulated in fp32 across chunks
                    grad_weight += (g.T @ scaled).float()
                grad_weight.index_add_(0, y, h.float(), alpha=-1.0)
                grad_bias += inv @ probs
                grad_bias.index_add_(0, y, torch.ones_like(inv), alpha=-1.0)
        ctx.has_bias = bias is not None
        ctx.dtype = weight.dtype
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.float()
        grad_h = grad_hidden * scale.to(grad_hidden.dtype)
        grad_w = (grad_weight * scale).to(ctx.dtype)
        grad_b = (grad_bias * scale).to(ctx.dtype) if ctx.has_bias else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(Σ cross-entropy [fp32, 0-dim], number of rows whose argmax equals the label [long, 0-dim]).

    hidden [N, H] (rows to predict, already through the head's transform), weight [V, H], bias [V] or None,
    labels [N] in [0, V) — callers drop ignored positions first.
    """
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} rows but {labels.shape[0]} labels")
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, with_grad)
