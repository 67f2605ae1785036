"""From a document's tokenized sentences to training blocks: packing, whole-word starts, bag-of-words targets.

Everything here is plain numpy on one document, so tests can recompute it and any runner gives the same
bytes. Packing follows BERT / the official RetroMAE `preprocess.py` (consecutive sentences of one document,
a random shorter target with probability `short_seq_prob`) with one fix: the official loop appends a
sentence before checking the length, so its blocks can exceed the limit and the trainer truncates them;
here no block exceeds the limit and a sentence longer than a block is split across blocks, never dropped.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOW_WEIGHTINGS = ("uniform", "tf")


@dataclass(frozen=True)
class PackedDocument:
    """All blocks of one document, column by column (no special tokens): one element per document between
    the tokenize and shard-writing steps, so a shuffle moves a few arrays, not thousands of row objects."""

    key: tuple[int, int]  # (input file index, line): the global sort order of documents in the shards
    doc_id: str
    block_lengths: np.ndarray  # int32, tokens per block, in block order
    input_ids: np.ndarray  # int32, the blocks' tokens concatenated
    word_starts: np.ndarray  # bool, aligned with input_ids; True at every block's first token
    bow_lengths: np.ndarray  # int32, unique tokens per block
    bow_ids: np.ndarray  # int32, each block's ascending unique ids, concatenated
    bow_weights: np.ndarray  # float32, aligned with bow_ids; each block's weights sum to 1

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def __reduce__(self):
        """Pickle compactly: Beam's coders pickle each document from the tokenizing worker to the runner and
        on to the shard writer, and the writer waits for every byte. Token ids go as uint16 when they fit,
        word starts as bits, uniform BoW weights not at all (recomputed bit for bit): about 2.5 bytes per
        token instead of 9, the same arrays after unpickling."""
        ids_type = np.uint16 if self.input_ids.max(initial=0) <= np.iinfo(np.uint16).max else np.int32
        uniform = np.array_equal(self.bow_weights, _uniform_weights(self.bow_lengths))
        return _unpickle_document, (
            self.key, self.doc_id, self.block_lengths, self.input_ids.astype(ids_type), np.packbits(self.word_starts),
            self.bow_lengths, self.bow_ids.astype(ids_type), None if uniform else self.bow_weights,
        )


def _uniform_weights(bow_lengths: np.ndarray) -> np.ndarray:
    return np.repeat((1.0 / bow_lengths).astype(np.float32), bow_lengths)


def _unpickle_document(key, doc_id, block_lengths, input_ids, word_start_bits, bow_lengths, bow_ids, bow_weights):
    return PackedDocument(
        key, doc_id, block_lengths, input_ids.astype(np.int32),
        np.unpackbits(word_start_bits, count=len(input_ids)).astype(bool), bow_lengths, bow_ids.astype(np.int32),
        _uniform_weights(bow_lengths) if bow_weights is None else bow_weights,
    )


def pack_sentences(
    lengths: Sequence[int], limit: int, short_seq_prob: float, rng: random.Random
) -> list[tuple[int, int]]:
    """Token spans [start, end) of the blocks: greedy over consecutive sentences, each block <= limit tokens.

    A block ends before the sentence that would overflow its target; the target is `limit`, or with
    probability `short_seq_prob` a random length in [min(3, limit), limit] (BERT's short sequences).
    """

    def draw_target() -> int:
        return limit if rng.random() >= short_seq_prob else rng.randint(min(3, limit), limit)

    spans: list[tuple[int, int]] = []
    start = end = 0
    target = draw_target()
    for length in lengths:
        if end > start and end - start + length > target:
            spans.append((start, end))
            start, target = end, draw_target()
        end += length
        while end - start > target:  # only when the sentence alone is longer than the target
            spans.append((start, start + target))
            start, target = start + target, draw_target()
    if end > start:
        spans.append((start, end))
    return spans


def word_starts_of(word_ids: np.ndarray, sentence_starts: np.ndarray) -> np.ndarray:
    """True where a token begins a word: its word id differs from the previous token's, or a sentence starts.

    `word_ids` are the tokenizer's per-sentence word indices concatenated over the document's sentences.
    """
    starts = np.ones(len(word_ids), dtype=bool)
    starts[1:] = word_ids[1:] != word_ids[:-1]
    starts[sentence_starts] = True
    return starts


def bow_target(input_ids: np.ndarray, weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """The block's bag-of-words target: its unique ids (ascending) and weights summing to 1.

    "uniform" gives every unique token 1/|unique| (the paper's target); "tf" weighs by term frequency.
    """
    ids, counts = np.unique(input_ids, return_counts=True)
    if weighting == "uniform":
        weights = np.full(len(ids), 1.0 / len(ids), dtype=np.float32)
    else:
        weights = (counts / counts.sum()).astype(np.float32)
    return ids.astype(np.int32), weights


def pack_document(
    doc_key: tuple[int, int],
    doc_id: str,
    input_ids: np.ndarray,
    word_starts: np.ndarray,
    sentence_lengths: Sequence[int],
    limit: int,
    short_seq_prob: float,
    rng: random.Random,
    weighting: str,
) -> PackedDocument:
    """Pack one tokenized document into blocks; a block's first token always counts as a word start."""
    spans = pack_sentences(sentence_lengths, limit, short_seq_prob, rng)
    starts = word_starts.copy()
    starts[[start for start, _ in spans]] = True
    targets = [bow_target(input_ids[start:end], weighting) for start, end in spans]
    return PackedDocument(
        key=doc_key,
        doc_id=doc_id,
        block_lengths=np.array([end - start for start, end in spans], dtype=np.int32),
        input_ids=input_ids,  # the spans tile the document: its blocks concatenated are its tokens
        word_starts=starts,
        bow_lengths=np.array([len(ids) for ids, _ in targets], dtype=np.int32),
        bow_ids=np.concatenate([ids for ids, _ in targets]),
        bow_weights=np.concatenate([weights for _, weights in targets]),
    )
