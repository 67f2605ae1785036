"""Batch tokenization inside Beam workers with the exact tokenizer the launcher checked.

The launcher loads the HF tokenizer once (a clear error before any work) and writes its `tokenizer.json`
into the run's temporary folder, which every worker reads in its DoFn's setup: remote workers need neither
the hub nor the local path, every worker encodes with the very vocabulary whose hash the manifest records,
and the job request carries a path, not the vocabulary (Dataflow refuses requests over 10 MB; a 250k-entry
vocabulary alone is about 17 MB).
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from apache_beam.io.filesystems import FileSystems

from preprocessing.packing import word_starts_of
from preprocessing.writes import OutputDir, atomic_create


def tokenizer_json(tokenizer) -> str:
    """The serialized Rust tokenizer behind a HF fast tokenizer."""
    return tokenizer.backend_tokenizer.to_str()


def stage_tokenizer(tokenizer, output: OutputDir) -> str:
    """The tokenizer's JSON written to the run's temporary folder; returns the path the workers read."""
    path = output.temporary("tokenizer.json")
    with atomic_create(output, path) as writer:
        writer.write(tokenizer_json(tokenizer).encode("utf-8"))
    return path


def read_staged_tokenizer(path: str) -> str:
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


@dataclass
class EncodedDocument:
    input_ids: np.ndarray  # int32, all sentences concatenated
    word_starts: np.ndarray  # bool, True where a token begins a word (always at a sentence's first token)
    sentence_lengths: list[int]


def continuation_table(serialized: str, tokenizer) -> np.ndarray | None:
    """For a WordPiece model, bool per token id: True for continuing pieces ("##ing"); None for other models.

    WordPiece starts every word with a piece without the prefix and continues it with prefixed pieces, so
    "not a continuation" is exactly "begins a word" by the tokenizer's word ids. Looking it up lets us
    encode without word-id and offset tracking (`encode_batch_fast`), about a quarter faster.
    """
    model = json.loads(serialized)["model"]
    if model.get("type") != "WordPiece":
        return None
    prefix = model.get("continuing_subword_prefix") or "##"
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for token, index in vocab.items():
        table[index] = token.startswith(prefix)
    return table


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
        self.continuation = continuation_table(serialized, self.tokenizer)

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_documents(self, documents: Sequence[Sequence[str]]) -> list[EncodedDocument]:
        """Encode every sentence of every document in one batch; regroup the results per document."""
        sentences = [s for doc in documents for s in doc]
        if self.continuation is not None:
            encodings = self.tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
        else:
            encodings = self.tokenizer.encode_batch(sentences, add_special_tokens=False)
        encoded, offset = [], 0
        for doc in documents:
            part = encodings[offset : offset + len(doc)]
            offset += len(doc)
            ids = [e.ids for e in part]
            lengths = [len(x) for x in ids]
            input_ids = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
            if self.continuation is not None:  # a WordPiece sentence never starts with a continuing piece
                word_starts = ~self.continuation[input_ids]
            else:
                word_ids = np.fromiter(itertools.chain.from_iterable(e.word_ids for e in part), dtype=np.int32)
                starts = np.cumsum([0] + lengths[:-1])
                word_starts = word_starts_of(word_ids, starts[starts < len(input_ids)])
            encoded.append(EncodedDocument(input_ids, word_starts, lengths))
        return encoded
