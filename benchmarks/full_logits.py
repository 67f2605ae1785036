"""The benchmarks' baseline: DupMAE computed as the official modeling_duplex.py does, with full logits.

Same parameters as `pretrain.modeling.DupMAEModel` (it wraps one), but the encoder's MLM head runs on
all B x L positions (the HF `labels=` path), the decoder's head on all B x L positions, and the BoW
max-pool reads those [B, L, V] encoder logits (official: positions 1.. under the attention mask, masked
tokens included) against a dense [B, V] target. Only the benchmarks import this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.modeling import DupMAEModel


class FullLogitsDupMAE(nn.Module):
    """Official-style losses around our model's modules; `forward` takes our collator's batch."""

    def __init__(self, model: DupMAEModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor, decoder_labels: Tensor, bow_ids: Tensor, bow_weights: Tensor) -> Tensor:
        mlm = self.model.mlm
        vocab = mlm.config.vocab_size
        out = mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        decoded = self.model._decode(out.hidden_states[-1][:, :1], decoder_input_ids, decoder_attention_mask.bool())
        decoder_logits = mlm.cls(decoded)  # [B, L, V]
        decoder_loss = F.cross_entropy(decoder_logits.view(-1, vocab), decoder_labels.view(-1))
        dense_target = torch.zeros(len(bow_ids), vocab, device=bow_ids.device).scatter_(1, bow_ids.long(),
                                                                                          bow_weights.float())
        offset = (1 - attention_mask[:, 1:, None].to(out.logits.dtype)) * -1000  # [B, L-1, 1]
        pooled = (out.logits[:, 1:] + offset).max(1).values  # [B, V]
        bow = torch.mean(-torch.sum(dense_target * F.log_softmax(pooled.float(), dim=-1), dim=1))
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
