"""Batch shard rows into DupMAE inputs with whole-batch tensor ops (no Python loop over tokens).

Per block x_1..x_n (stored without specials) the batch holds [CLS] x_1..x_n [SEP], padded, and:
- encoder input: whole words masked until ⌊p_enc·n⌉ tokens (words drawn in random order, a word that would
  overshoot ends the draw), each masked token then [MASK] 80 % / random token 10 % / unchanged 10 %;
  [CLS], [SEP] and padding are never masked;
- decoder attention [B, L, L]: row i sees position 0, [SEP], and each other word with probability 1−p_dec
  (one draw per (row, word), so whole words are hidden together), never itself; rows without a target
  see position 0 only, so no softmax row is empty;
- BoW targets: the shard's unique ids and weights, padded with weight 0.
The official collator draws min(n, 256) masks per sample in Python and gives each row one of them; the
per-row distribution here is the same in kind (whole words, rate p_dec) and costs one [B, L, W] draw.

All randomness comes from the `generator` passed per call, so a batch is a pure function of
(rows, generator seed): the training loop seeds it from (seed, rank, step) and resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class CollatorConfig:
    """Masking rates and padding of pre-training batches."""

    max_seq_length: int = field(
        default=512, metadata={"help": "tokens per block including [CLS] and [SEP]; rows must have <= this - 2"})
    encoder_mlm_probability: float = field(
        default=0.3, metadata={"help": "share of each block's tokens masked for the encoder (whole words)"})
    decoder_mlm_probability: float = field(
        default=0.5, metadata={"help": "probability that a word is hidden from a decoder row"})
    mask_token_probability: float = field(
        default=0.8, metadata={"help": "share of encoder-masked tokens replaced by [MASK]"})
    random_token_probability: float = field(
        default=0.1, metadata={"help": "share replaced by a random token (the rest stay unchanged)"})
    pad_to_multiple_of: int = field(
        default=8, metadata={"help": "pad the batch length up to a multiple of this (tensor-core friendly)"})

    def __post_init__(self) -> None:
        if self.max_seq_length < 3:
            raise ValueError(f"CollatorConfig.max_seq_length must be >= 3, got {self.max_seq_length}")
        for name in ("encoder_mlm_probability", "decoder_mlm_probability", "mask_token_probability",
                     "random_token_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CollatorConfig.{name} must be in [0, 1], got {value}")
        if self.mask_token_probability + self.random_token_probability > 1.0:
            raise ValueError("CollatorConfig: mask_token_probability + random_token_probability must be <= 1")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"CollatorConfig.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")


def _concat(rows: list[dict], key: str, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(row[key], dtype=dtype) for row in rows]) if rows else np.zeros(0, dtype)


class DupMAECollator:
    """rows (dicts of shard columns) -> the keyword arguments of `DupMAEModel.forward`.

    Output shapes (B rows, L = padded length, T = most unique tokens in a row):
      input_ids [B, L] long (encoder input, masked), attention_mask [B, L] long,
      labels [B, L] long (original id at encoder-masked positions, -100 elsewhere),
      decoder_input_ids [B, L] long (unmasked), decoder_attention_mask [B, L, L] bool (True = visible),
      decoder_labels [B, L] long (original id at x_1..x_n, -100 at [CLS]/[SEP]/padding),
      bow_ids [B, T] long, bow_weights [B, T] float32 (0 on padding).
    """

    def __init__(self, config: CollatorConfig, *, cls_id: int, sep_id: int, pad_id: int, mask_id: int,
                 vocab_size: int):
        if vocab_size <= 0:
            raise ValueError(f"DupMAECollator: vocab_size must be positive, got {vocab_size}")
        for name, value in (("cls_id", cls_id), ("sep_id", sep_id), ("pad_id", pad_id), ("mask_id", mask_id)):
            if value is None or not 0 <= value < vocab_size:
                raise ValueError(f"DupMAECollator: {name}={value} is not a token id below vocab_size {vocab_size}")
        self.config = config
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = cls_id, sep_id, pad_id, mask_id
        self.vocab_size = vocab_size

    @classmethod
    def from_tokenizer(cls, tokenizer, config: CollatorConfig) -> "DupMAECollator":
        return cls(config, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id,
                   pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))

    def _check(self, rows: list[dict], lengths: np.ndarray) -> None:
        limit = self.config.max_seq_length - 2
        for i, row in enumerate(rows):
            if lengths[i] > limit:
                raise ValueError(f"row {i}: input_ids has {lengths[i]} tokens > max_seq_length - 2 = {limit}")
            if len(row["word_starts"]) != lengths[i]:
                raise ValueError(f"row {i}: word_starts has {len(row['word_starts'])} entries for {lengths[i]} "
                                 "input_ids")
            if len(row["bow_ids"]) != len(row["bow_weights"]):
                raise ValueError(f"row {i}: bow_ids has {len(row['bow_ids'])} entries, bow_weights "
                                 f"{len(row['bow_weights'])}")

    def __call__(self, rows: list[dict], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        cfg = self.config
        lengths = np.fromiter((len(row["input_ids"]) for row in rows), dtype=np.int64, count=len(rows))
        self._check(rows, lengths)
        batch = len(rows)
        multiple = cfg.pad_to_multiple_of
        length = -(-(int(lengths.max(initial=0)) + 2) // multiple) * multiple
        n = torch.from_numpy(lengths)  # [B]
        positions = torch.arange(length)  # [L]
        content = (positions[None] >= 1) & (positions[None] <= n[:, None])  # [B, L] x_1..x_n
        attention = positions[None] < (n + 2)[:, None]  # [B, L]

        flat_ids = _concat(rows, "input_ids", np.int64)
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids outside [0, {self.vocab_size}) in this batch")
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        ids[content] = torch.from_numpy(flat_ids)
        ids[:, 0] = self.cls_id
        ids[torch.arange(batch), n + 1] = self.sep_id
        starts = torch.zeros(batch, length, dtype=torch.bool)
        starts[content] = torch.from_numpy(_concat(rows, "word_starts", np.bool_))
        starts[:, 1] = True  # the first token always begins a word
        word = (starts.long().cumsum(1) - 1).clamp(min=0)  # [B, L] word index of each token
        n_words = (starts & content).sum(1)  # [B]
        max_words = max(1, int(n_words.max())) if batch else 1

        masked = self._encoder_mask(word, content, n, n_words, max_words, generator)  # [B, L]
        input_ids, labels = self._corrupt(ids, masked, generator)
        visible = self._decoder_visibility(word, content, attention, max_words, generator)  # [B, L, L]
        bow_ids, bow_weights = self._bow(rows)
        return {
            "input_ids": input_ids,
            "attention_mask": attention.long(),
            "labels": labels,
            "decoder_input_ids": ids,
            "decoder_attention_mask": visible,
            "decoder_labels": torch.where(content, ids, IGNORE_INDEX),
            "bow_ids": bow_ids,
            "bow_weights": bow_weights,
        }

    def _encoder_mask(self, word: Tensor, content: Tensor, n: Tensor, n_words: Tensor, max_words: int,
                      generator: torch.Generator | None) -> Tensor:
        """Whole words in random order until the next would pass round(p·n) tokens -> [B, L] bool."""
        batch = word.shape[0]
        word_len = torch.zeros(batch, max_words, dtype=torch.long).scatter_add_(1, word, content.long())  # [B, W]
        scores = torch.rand(batch, max_words, generator=generator)  # random word order
        scores.masked_fill_(torch.arange(max_words)[None] >= n_words[:, None], 2.0)  # absent words last
        order = scores.argsort(1)  # [B, W]
        budget = (n.double() * self.config.encoder_mlm_probability).round().long()  # [B]
        budget = torch.where(n > 0, budget.clamp(min=1), budget)
        chosen_sorted = word_len.gather(1, order).cumsum(1) <= budget[:, None]  # [B, W]
        chosen = torch.zeros_like(chosen_sorted).scatter_(1, order, chosen_sorted)  # [B, W]
        return chosen.gather(1, word) & content

    def _corrupt(self, ids: Tensor, masked: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """BERT's 80/10/10 on the masked tokens -> (encoder input_ids, labels)."""
        cfg = self.config
        draw = torch.rand(ids.shape, generator=generator)  # [B, L]
        to_mask = masked & (draw < cfg.mask_token_probability)
        to_random = masked & ~to_mask & (draw < cfg.mask_token_probability + cfg.random_token_probability)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator)  # [B, L]
        input_ids = torch.where(to_mask, self.mask_id, torch.where(to_random, random_ids, ids))
        return input_ids, torch.where(masked, ids, IGNORE_INDEX)

    def _decoder_visibility(self, word: Tensor, content: Tensor, attention: Tensor, max_words: int,
                            generator: torch.Generator | None) -> Tensor:
        """[B, L, L] bool: row i sees column j; whole words hidden with p_dec per row, never the row itself."""
        batch, length = word.shape
        hidden_words = torch.rand(batch, length, max_words, generator=generator) < self.config.decoder_mlm_probability
        hidden = hidden_words.gather(2, word[:, None, :].expand(batch, length, length))  # [B, L(row), L(col)]
        visible = attention[:, None, :] & ~(hidden & content[:, None, :])  # specials stay visible, padding not
        visible &= content[:, :, None]  # rows without a target: see only position 0 (set below)
        visible.diagonal(dim1=1, dim2=2).fill_(False)
        visible[:, :, 0] = True
        return visible

    @staticmethod
    def _bow(rows: list[dict]) -> tuple[Tensor, Tensor]:
        sizes = torch.tensor([len(row["bow_ids"]) for row in rows], dtype=torch.long)  # [B]
        width = max(1, int(sizes.max())) if len(rows) else 1
        present = torch.arange(width)[None] < sizes[:, None]  # [B, T]
        bow_ids = torch.zeros(len(rows), width, dtype=torch.long)
        bow_weights = torch.zeros(len(rows), width, dtype=torch.float32)
        bow_ids[present] = torch.from_numpy(_concat(rows, "bow_ids", np.int64))
        bow_weights[present] = torch.from_numpy(_concat(rows, "bow_weights", np.float32))
        return bow_ids, bow_weights
