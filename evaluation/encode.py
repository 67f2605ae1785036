"""Encode texts fast and in input order: length-sorted, token-budget batches under torch.inference_mode.

Sorting by length means a batch pads to almost nothing; the token budget (batch rows x longest row) keeps every
batch the same amount of work, so short texts go in big batches and long ones in small, cache-friendly ones.
Documents keep their top-k vocabulary entries (dupmae); queries keep their whole vocabulary vector, since the
score reads the query at each document's kept indices.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common import precision
from common.representation import Encoder, sparsify

logger = logging.getLogger(__name__)

TOKENIZE_CHUNK = 65536  # texts tokenized per call: bounds the Python lists alive at once


@dataclass
class Encoded:
    """Representations of N texts, rows in the order of `ids`."""

    ids: list[str]
    dense: np.ndarray  # [N, D] float32
    sparse_indices: np.ndarray | None = None  # [N, k] int32: documents' kept vocabulary ids (dupmae)
    sparse_values: np.ndarray | None = None  # [N, k] float32
    vocab: np.ndarray | None = None  # [N, V] float32: queries' full vocabulary vectors (dupmae)
    source: str | None = None  # the cache folder the arrays are memory-mapped from (named in errors)
    digest: str | None = None  # sha256 of the cache entry's ids and arrays: what search hits are keyed on

    ARRAYS = ("dense", "sparse_indices", "sparse_values", "vocab")

    @classmethod
    def concat(cls, parts: list["Encoded"]) -> "Encoded":
        parts = [p for p in parts if p.ids] or parts[:1]  # an empty shard has no array shapes to agree with
        arrays = {}
        for name in cls.ARRAYS:
            values = [getattr(p, name) for p in parts]
            arrays[name] = None if values[0] is None else np.concatenate(values)
        return cls([i for p in parts for i in p.ids], **arrays)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All texts as one flat int32 token array plus offsets [N + 1] (with [CLS]/[SEP], truncated)."""
    flat, lengths = [], []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids = tokenizer(texts[start:start + TOKENIZE_CHUNK], truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths.extend(len(x) for x in ids)
        flat.append(np.fromiter((t for x in ids for t in x), dtype=np.int32))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(flat) if flat else np.zeros(0, np.int32)), offsets


def token_budget_batches(lengths: np.ndarray, max_tokens: int, batch_size: int) -> list[np.ndarray]:
    """Row indices, longest first, grouped so rows x longest length <= max_tokens (and rows <= batch_size)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, min(batch_size, max_tokens // max(longest, 1)))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def _pad(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = offsets[rows + 1] - offsets[rows]
    input_ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[r, :n] = flat[offsets[row]:offsets[row] + n]
        mask[r, :n] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively and faster than fp32 on `device` (`common.precision`'s rule, as `--bf16 auto`)."""
    return precision.native_bf16(device)[0]


def encode_texts(encoder: Encoder, tokenizer, ids: list[str], texts: list[str], *, documents: bool,
                 max_length: int, max_tokens: int, batch_size: int, bf16: bool = False,
                 desc: str = "encoding") -> Encoded:
    """Encode texts in length-sorted token-budget batches; rows come back in input order, float32."""
    return encode_texts_many([encoder], tokenizer, ids, texts, documents=documents, max_length=max_length,
                             max_tokens=max_tokens, batch_size=batch_size, bf16=bf16, desc=desc)[0]


def encode_texts_many(encoders: list[Encoder], tokenizer, ids: list[str], texts: list[str], *, documents: bool,
                      max_length: int, max_tokens: int, batch_size: int, bf16: bool = False,
                      desc: str = "encoding") -> list[Encoded]:
    """`encode_texts` for several representations of one encoder network (e.g. mean and dupmae of one model):
    each batch runs the network once and every encoder represents its hidden states."""
    base = encoders[0].model.base_model
    if any(encoder.model.base_model is not base for encoder in encoders):
        raise ValueError("encode_texts_many: the encoders must share one encoder network")
    device = next(encoders[0].parameters()).device
    flat, offsets = tokenize(tokenizer, texts, max_length)
    outputs = [_Output(len(texts), documents, encoder.config.top_k) for encoder in encoders]
    native, why = precision.native_bf16(device)
    if bf16 and not native:
        logger.warning("bf16 requested but %s has no native bf16 (%s; CPU capability %s): expect it slower than fp32",
                       device, why, torch.backends.cpu.get_cpu_capability())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for encoder in encoders:
        encoder.eval()
    with torch.inference_mode(), autocast, tqdm(total=len(texts), desc=desc, unit="text", mininterval=5) as bar:
        for rows in token_budget_batches(np.diff(offsets), max_tokens, batch_size):
            input_ids, mask = _pad(flat, offsets, rows, tokenizer.pad_token_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            hidden = encoders[0].hidden_states(input_ids, mask)
            for encoder, output in zip(encoders, outputs):
                output.add(rows, encoder.represent(hidden, mask))
            bar.update(len(rows))
    return [output.finish(ids) for output in outputs]


class _Output:
    """The arrays of one representation, filled batch by batch (shapes known at the first batch)."""

    def __init__(self, n: int, documents: bool, top_k: int):
        self.n, self.documents, self.top_k = n, documents, top_k
        self.dense = self.vocab = self.sparse_indices = self.sparse_values = None

    def add(self, rows: np.ndarray, out) -> None:
        if self.dense is None:
            self.dense = np.empty((self.n, out.dense.shape[1]), dtype=np.float32)
        self.dense[rows] = out.dense.float().cpu().numpy()
        if out.vocab is None:
            return
        if self.documents:  # documents keep their top-k entries; queries their whole vector
            idx, val = sparsify(out.vocab.float(), self.top_k)
            if self.sparse_indices is None:
                self.sparse_indices = np.empty((self.n, idx.shape[1]), dtype=np.int32)
                self.sparse_values = np.empty((self.n, idx.shape[1]), dtype=np.float32)
            self.sparse_indices[rows] = idx.cpu().numpy()
            self.sparse_values[rows] = val.cpu().numpy()
        else:
            if self.vocab is None:
                self.vocab = np.empty((self.n, out.vocab.shape[1]), dtype=np.float32)
            self.vocab[rows] = out.vocab.float().cpu().numpy()

    def finish(self, ids: list[str]) -> Encoded:
        dense = self.dense if self.dense is not None else np.zeros((0, 0), dtype=np.float32)  # no texts at all
        return Encoded(list(ids), dense, self.sparse_indices, self.sparse_values, self.vocab)
