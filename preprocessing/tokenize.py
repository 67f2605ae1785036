"""Batch tokenization inside Beam workers with the exact tokenizer the launcher checked.

The launcher loads the HF tokenizer once (a clear error before any work) and ships its `tokenizer.json`
text to the workers, so remote workers need neither the hub nor the local path and every worker encodes
with the very vocabulary whose hash the manifest records.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def tokenizer_json(tokenizer) -> str:
    """The serialized Rust tokenizer behind a HF fast tokenizer."""
    return tokenizer.backend_tokenizer.to_str()


@dataclass
class EncodedDocument:
    input_ids: np.ndarray  # int32, all sentences concatenated
    word_ids: np.ndarray  # int32, the tokenizer's word index within each sentence
    sentence_lengths: list[int]


def set_worker_threads(threads: int, launcher_pid: int) -> None:
    """Give each Beam worker process `threads` Rust tokenizer threads (1: none).

    Beam already runs one worker per core; a second tokenizer thread per worker keeps the cores busy while
    a worker runs its Python part (splitting, packing, BoW) or waits for data, and measured faster on 2
    busy cores than 1. Only done in a separate worker process (before its first encode, when the thread
    pool starts): an in-process run must not change its host's environment.
    """
    if os.getpid() != launcher_pid:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        os.environ["RAYON_NUM_THREADS"] = str(threads)


class BatchEncoder:
    """Encodes many texts per call (no special tokens), optionally truncated to `max_length` tokens."""

    def __init__(self, serialized: str, max_length: int | None = None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(serialized)
        self.tokenizer.no_padding()
        if max_length is None:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(max_length)

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_documents(self, documents: Sequence[Sequence[str]]) -> list[EncodedDocument]:
        """Encode every sentence of every document in one batch; regroup the results per document."""
        encodings = self.tokenizer.encode_batch([s for sentences in documents for s in sentences], add_special_tokens=False)
        encoded, offset = [], 0
        for sentences in documents:
            part = encodings[offset : offset + len(sentences)]
            offset += len(sentences)
            ids = [e.ids for e in part]
            word_ids = [e.word_ids for e in part]
            encoded.append(
                EncodedDocument(
                    input_ids=np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32),
                    word_ids=np.fromiter(itertools.chain.from_iterable(word_ids), dtype=np.int32),
                    sentence_lengths=[len(x) for x in ids],
                )
            )
        return encoded
