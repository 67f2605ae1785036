"""Loading tokenizers with a clear error, and a vocabulary fingerprint that shards and checkpoints record."""
from __future__ import annotations

import hashlib
import json

from common.defaults import resolve_model


class TokenizerError(ValueError):
    """Raised before any work when a tokenizer cannot be loaded or does not match the data."""


def load_tokenizer(name_or_path: str | None):
    """A HF *fast* tokenizer (word ids are needed for whole-word masking), or a one-line TokenizerError."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, use_fast=True)
    except Exception as exc:  # HF raises OSError/ValueError/HFValidationError depending on the cause
        raise TokenizerError(f"cannot load tokenizer {name_or_path!r} (resolved to {resolved!r}): {exc}") from None
    if not tokenizer.is_fast:
        raise TokenizerError(f"tokenizer {name_or_path!r} is not a fast tokenizer; word ids need one")
    return tokenizer


def vocab_hash(tokenizer) -> str:
    """sha256 over the (token, id) pairs sorted by id: equal hashes mean identical token ids."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
