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
    """Whether bf16 matmuls run natively (AVX512-BF16 / AMX on CPU); emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode_texts(encoder: Encoder, tokenizer, ids: list[str], texts: list[str], *, documents: bool,
                 max_length: int, max_tokens: int, batch_size: int, bf16: bool = False,
                 desc: str = "encoding") -> Encoded:
    """Encode texts in length-sorted token-budget batches; rows come back in input order, float32."""
    device = next(encoder.parameters()).device
    flat, offsets = tokenize(tokenizer, texts, max_length)
    n = len(texts)
    dense = vocab = sparse_indices = sparse_values = None
    if bf16 and not native_bf16(device):
        logger.warning("bf16 requested but %s has no native bf16 (CPU capability %s): expect it slower than fp32",
                       device, torch.backends.cpu.get_cpu_capability())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    encoder.eval()
    with torch.inference_mode(), autocast, tqdm(total=n, desc=desc, unit="text", mininterval=5) as bar:
        for rows in token_budget_batches(np.diff(offsets), max_tokens, batch_size):
            input_ids, mask = _pad(flat, offsets, rows, tokenizer.pad_token_id)
            out = encoder(input_ids.to(device), mask.to(device))
            if dense is None:
                dense = np.empty((n, out.dense.shape[1]), dtype=np.float32)
            dense[rows] = out.dense.float().cpu().numpy()
            if out.vocab is not None and documents:
                idx, val = sparsify(out.vocab.float(), encoder.config.top_k)
                if sparse_indices is None:
                    sparse_indices = np.empty((n, idx.shape[1]), dtype=np.int32)
                    sparse_values = np.empty((n, idx.shape[1]), dtype=np.float32)
                sparse_indices[rows] = idx.cpu().numpy()
                sparse_values[rows] = val.cpu().numpy()
            elif out.vocab is not None:
                if vocab is None:
                    vocab = np.empty((n, out.vocab.shape[1]), dtype=np.float32)
                vocab[rows] = out.vocab.float().cpu().numpy()
            bar.update(len(rows))
    if dense is None:  # no texts at all
        dense = np.zeros((0, 0), dtype=np.float32)
    return Encoded(list(ids), dense, sparse_indices, sparse_values, vocab)
