"""The benchmarks' re-implementation of the official modeling_duplex.py, for runs without the official code.

Same parameters as `pretrain.modeling.DupMAEModel` (it wraps one, built with `cpu_attention=False`: HF's
SDPA attention in the encoder, as transformers 4.46 gives the official BertForMaskedLM), and what the
official code computes and keeps for backward: the encoder's MLM head on all B x L positions (the HF
`labels=` path), the decoder's head on all B x L positions, the BoW max-pool over those [B, L, V] encoder
logits (positions 1.. under the attention mask, masked tokens included) against a dense [B, V] target, and
the decoder's attention written out as the official enhancedDecoder.py does it (an additive float mask,
softmax, dropout, matmul; `official_attention`). Only the benchmarks import this module.

Where it still differs from the official run: it runs under our transformers (5), whose import and model
loading take more memory than 4.46's (`benchmarks/pretrain_step.py --official_src` measures both); its
BoW target weighs each unique token 1/|unique| (the official 1/n); the decoder's weights are drawn by
`EnhancedDecoderLayer.reset_parameters` (same distribution as the official `_init_weights`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.official_dupmae import dense_bow_target
from pretrain.modeling import DupMAEModel


def official_attention(query: Tensor, key: Tensor, value: Tensor, visible: Tensor, dropout_p: float) -> Tensor:
    """The official decoder attention: q, k, v [B, h, L, d], visible [B, 1, L, L] bool -> [B, h, L, d].

    As `BertSelfAttention` in enhancedDecoder.py with the mask from `get_extended_attention_mask`:
    (1 - mask) · finfo.min added to q kᵀ / √d, softmax, `nn.Dropout`, times v (autograd keeps the
    probabilities, the dropout's bool mask and the dropped probabilities).
    """
    additive = (1.0 - visible.to(query.dtype)) * torch.finfo(query.dtype).min  # [B, 1, L, L]
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1]) + additive
    probs = F.dropout(scores.softmax(dim=-1), dropout_p)
    return torch.matmul(probs, value)


class FullLogitsDupMAE(nn.Module):
    """Official-style losses around our model's modules; `forward` takes our collator's batch."""

    def __init__(self, model: DupMAEModel):
        super().__init__()
        self.model = model
        model.decoder.attention = official_attention

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor, decoder_labels: Tensor, bow_ids: Tensor, bow_weights: Tensor) -> Tensor:
        mlm = self.model.mlm
        vocab = mlm.config.vocab_size
        out = mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        decoded = self.model._decode(out.hidden_states[-1][:, :1], decoder_input_ids, decoder_attention_mask.bool())
        decoder_logits = mlm.cls(decoded)  # [B, L, V]
        decoder_loss = F.cross_entropy(decoder_logits.view(-1, vocab), decoder_labels.view(-1))
        dense_target = dense_bow_target(bow_ids, bow_weights, vocab)  # [B, V]
        offset = (1 - attention_mask[:, 1:, None]) * -1000  # [B, L-1, 1] int64, as the official code
        pooled = (out.logits[:, 1:] + offset).max(1).values  # [B, V]
        bow = torch.mean(-torch.sum(dense_target * F.log_softmax(pooled, dim=-1), dim=1))
        return decoder_loss + self.model.config.bow_weight * bow + out.loss


def random_rows(n_rows: int, block_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Shard-like rows of random ids above BERT's special ids (~1.3 tokens per word), for benchmarks without text."""
    import numpy as np

    if vocab_size <= 200:
        raise ValueError(f"random_rows: vocab_size {vocab_size} is too small (ids start at 104)")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        ids = rng.integers(104, vocab_size, block_len).astype(np.int32)
        starts = rng.random(block_len) < 0.75
        starts[0] = True
        unique = np.unique(ids)
        rows.append({"input_ids": ids, "word_starts": starts, "bow_ids": unique,
                     "bow_weights": np.full(len(unique), 1 / len(unique), dtype=np.float32)})
    return rows
