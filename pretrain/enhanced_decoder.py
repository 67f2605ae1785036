"""RetroMAE's enhanced decoder: one BERT-style layer whose queries and keys/values are different streams.

    query stream  q_i = Emb(h_CLS at position i)          = LN(h_CLS + p_i + type_0)            [B, L, H]
    key/value     k_0 = h_CLS,  k_j = Emb(x_j) (j ≥ 1)      (the *unmasked* input, positions added) [B, L, H]
    attention     row i attends to the positions with visible[b, i, j] (from the collator):
                  position 0 always, a random whole-word subset of the others, never itself
    output        BERT layer: LN(q + Attn(q, k, v)) then LN(x + FFN(x))

Each row i has to reconstruct x_i from h_CLS plus a different random context, so the sentence embedding
carries the information (RetroMAE §3.2). Written here with `scaled_dot_product_attention` instead of
subclassing HF's BertLayer internals, which change between transformers versions (`cpu_attention.attention`:
SDPA, with a faster dropout on CPU).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from pretrain.cpu_attention import attention


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)


class EnhancedDecoderLayer(nn.Module):
    """One transformer layer sized from the encoder's config (hidden, heads, intermediate, act, dropout, eps).

    cpu_attention=False: PyTorch SDPA everywhere (as HF's BERT), instead of `cpu_attention.attention`.
    """

    def __init__(self, config, cpu_attention: bool = True):
        super().__init__()
        hidden = config.hidden_size
        if hidden % config.num_attention_heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.attention = attention if cpu_attention else _sdpa
        self.reset_parameters(config.initializer_range)

    def reset_parameters(self, std: float) -> None:
        """BERT's init: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)  # [B, h, L, d]

    def forward(self, query_states: Tensor, kv_states: Tensor, visible: Tensor) -> Tensor:
        """query_states, kv_states [B, L, H]; visible [B, L, L] bool (row i may attend to column j) -> [B, L, H]."""
        batch, length, hidden = query_states.shape
        q = self._split_heads(self.query(query_states))  # [B, h, L, d]
        k = self._split_heads(self.key(kv_states))  # [B, h, L, d]
        v = self._split_heads(self.value(kv_states))  # [B, h, L, d]
        context = self.attention(q, k, v, visible[:, None], self.attention_dropout if self.training else 0.0)
        context = context.transpose(1, 2).reshape(batch, length, hidden)  # [B, L, H]
        attended = self.attention_norm(self.dropout(self.attention_output(context)) + query_states)
        ffn = self.output(self.act(self.intermediate(attended)))
        return self.output_norm(self.dropout(ffn) + attended)
