"""BM25 as the field reports it, shared by mining, fusion, the teacher scores and the reference rows.

    from common.bm25 import BM25, STANDARD
    index = BM25(corpus_texts)                      # Anserini's BEIR baseline: k1 0.9, b 0.4, Porter stemming
    positions = index.search(query_texts, depth)    # each query's best corpus positions, best first
    scores = index.scores(query_text)               # [N] float32: the query's score for every document

The package is `bm25s` (Lucene's BM25 formula with `method="lucene"`), its tokenizer given a PyStemmer stemmer,
Lucene's English stop words and one-letter tokens, so there is no BM25 of our own. BEIR's published BM25 (Anserini: Lucene's
EnglishAnalyzer, i.e. lowercasing, its 33 stop words and the Porter stemmer; k1 0.9, b 0.4) scores SciFact test
nDCG@10 0.6789; `STANDARD` reproduces it (docs/results.md#bm25). `BM25S_DEFAULTS` is the project's BM25 before
issue 31 (bm25s defaults k1 1.5, b 0.75, no stemming, bm25s's English stop words, tokens of 2+ letters; SciFact 0.6617),
kept behind `--bm25 bm25s-defaults` wherever BM25 runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET, the stop words of Anserini's BEIR runs.
LUCENE_STOPWORDS = ("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
                    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they",
                    "this", "to", "was", "will", "with")


@dataclass(frozen=True)
class BM25Config:
    """What defines a BM25 ranking: the term weights and the analyzer."""

    k1: float = 0.9  # term-frequency saturation
    b: float = 0.4  # document-length normalization
    method: str = "lucene"  # bm25s's variant of the formula (idf log(1 + (N - df + .5) / (df + .5)), as Lucene)
    stemmer: str | None = "porter"  # a PyStemmer algorithm ("porter": Lucene's PorterStemFilter), None: none
    stopwords: str | tuple[str, ...] = LUCENE_STOPWORDS  # a bm25s list name ("en") or the words
    token_pattern: str = r"(?u)\b\w+\b"  # a token: a run of word characters, one letter too (Lucene's tokenizer)


STANDARD = BM25Config()
BM25S_DEFAULTS = BM25Config(k1=1.5, b=0.75, stemmer=None, stopwords="en", token_pattern=r"(?u)\b\w\w+\b")
PRESETS = {"standard": STANDARD, "bm25s-defaults": BM25S_DEFAULTS}
PRESET_HELP = ("BM25: 'standard' (Anserini's BEIR baseline: k1 0.9, b 0.4, Porter stemming, Lucene stop words; "
               "SciFact 0.6789) or 'bm25s-defaults' (k1 1.5, b 0.75, no stemming: the project's BM25 before issue 31)")


def preset(name: str) -> BM25Config:
    if name not in PRESETS:
        raise ValueError(f"unknown BM25 preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


class BM25:
    """A bm25s index of `corpus` (texts; positions are list indices) under `config`."""

    def __init__(self, corpus: list[str], config: BM25Config = STANDARD):
        import bm25s

        self.config, self.size = config, len(corpus)
        self._stemmer = None
        if config.stemmer:
            import Stemmer  # PyStemmer

            self._stemmer = Stemmer.Stemmer(config.stemmer)
        self._retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        self._retriever.index(self._tokenize(corpus), show_progress=False)

    def _tokenize(self, texts: list[str], ids: bool = True):
        import bm25s

        stopwords = list(self.config.stopwords) if isinstance(self.config.stopwords, tuple) else self.config.stopwords
        return bm25s.tokenize(texts, stopwords=stopwords, stemmer=self._stemmer, token_pattern=self.config.token_pattern,
                              return_ids=ids, show_progress=False)

    def search(self, queries: list[str], depth: int) -> list[list[int]]:
        """Each query's top-`depth` corpus positions, best first."""
        if not queries:
            return []
        ids, _ = self._retriever.retrieve(self._tokenize(queries), k=min(depth, self.size), show_progress=False)
        return ids.tolist()

    def scores(self, query: str) -> np.ndarray:
        """[N] float32: the query's BM25 score for every corpus position (0 where no term matches; all 0 for a query
        without terms, empty or only stop words)."""
        (tokens,) = self._tokenize([query], ids=False)
        if not tokens:  # bm25s reads tokens[0]
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(tokens), dtype=np.float32)


def bm25_search(queries: list[str], corpus: list[str], depth: int, config: BM25Config = STANDARD) -> list[list[int]]:
    """Each query's top-`depth` corpus positions by BM25, best first."""
    return BM25(corpus, config).search(queries, depth)
