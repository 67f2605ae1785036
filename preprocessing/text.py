"""Text normalization and a rule-based sentence splitter.

Why regular expressions and not NLTK's punkt (which the official RetroMAE preprocessing uses): punkt needs a
model download at run time, which offline machines and locked-down Dataflow workers cannot do, and its
output depends on the punkt version installed. Sentence boundaries only decide where a packed block may
end (blocks are filled up to max_seq_length anyway), so a missed or extra boundary costs at most one block
that starts mid-sentence; a deterministic, dependency-free splitter is the better trade.
"""
from __future__ import annotations

import re
import unicodedata

# Control and format characters other than whitespace: zero-width joiners, BOMs, stray escapes.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u2060\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")
# A sentence ends at . ! ? (optionally closed by quotes or brackets) followed by whitespace and a capital
# letter, a digit, or an opening quote/bracket.
_BOUNDARY = re.compile(r"([.!?])[\"'\u201d\u2019)\]]*(\s+)(?=[\"'\u201c\u2018(\[]*[A-Z0-9\u00c0-\u00de])")
# Words that end in a period without ending the sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e cf fig no vol pp ed eds gen col capt lt sgt rev hon mt ft".split()
)


def normalize(text: str) -> str:
    """NFC, no control characters, single spaces, lines stripped; a paragraph break is exactly one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = (" ".join(line.split()) for line in _CONTROL.sub("", text).split("\n"))  # str.split: C speed
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the period just before `end` closes an abbreviation or an initial ("J. Smith")."""
    start = text.rfind(" ", 0, end) + 1
    word = text[start:end].rstrip(".\"')]\u201d\u2019").lstrip("\"'([\u201c\u2018").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Sentences of normalized text, in order; paragraphs always end a sentence, lines within one do not."""
    sentences = []
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.replace("\n", " ")
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            if match.group(1) == "." and _is_abbreviation(paragraph, match.end(1)):
                continue
            sentences.append(paragraph[start : match.start(2)])
            start = match.end(2)
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]
