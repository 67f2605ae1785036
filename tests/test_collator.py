"""pretrain.collator: layout, whole-word masking ratios, 80/10/10, decoder visibility rules, determinism, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.collator import CollatorConfig, DupMAECollator

PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 30522


def collator(**overrides) -> DupMAECollator:
    return DupMAECollator(CollatorConfig(**overrides), cls_id=CLS, sep_id=SEP, pad_id=PAD, mask_id=MASK,
                          vocab_size=VOCAB)


def rows_of(lengths, seed=0, start_probability=0.7) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(1000, VOCAB, n).astype(np.int32)
        starts = rng.random(n) < start_probability
        if n:
            starts[0] = True
        unique = np.unique(ids)
        rows.append({"input_ids": ids, "word_starts": starts, "bow_ids": unique,
                     "bow_weights": np.full(len(unique), 1 / max(1, len(unique)), np.float32)})
    return rows


def word_index(row) -> np.ndarray:
    return np.cumsum(np.asarray(row["word_starts"])) - 1


@pytest.fixture(scope="module")
def big_batch():
    rows = rows_of([510] * 24 + [37, 1, 0, 200], seed=1)
    return rows, collator()(rows, torch.Generator().manual_seed(5))


def test_layout_specials_and_labels(big_batch):
    rows, batch = big_batch
    length = batch["input_ids"].shape[1]
    assert length == 512 and length % 8 == 0
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        original = batch["decoder_input_ids"][b]
        assert original[0] == CLS and original[n + 1] == SEP and (original[n + 2:] == PAD).all()
        assert original[1:n + 1].tolist() == list(row["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * (n + 2) + [0] * (length - n - 2)
        specials = torch.ones(length, dtype=torch.bool)
        specials[1:n + 1] = False
        assert (batch["labels"][b][specials] == -100).all()  # never mask [CLS], [SEP], padding
        assert torch.equal(batch["input_ids"][b][specials], original[specials])
        assert (batch["decoder_labels"][b][specials] == -100).all()
        assert torch.equal(batch["decoder_labels"][b][1:n + 1], original[1:n + 1])
        masked = batch["labels"][b] != -100
        assert torch.equal(batch["labels"][b][masked], original[masked])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask",
                          "decoder_labels", "bow_ids", "bow_weights"}


def test_encoder_mask_is_whole_words_at_the_right_rate(big_batch):
    rows, batch = big_batch
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        if n == 0:
            continue
        masked = (batch["labels"][b, 1:n + 1] != -100).numpy()
        words = word_index(row)
        for w in np.unique(words[masked]):
            assert masked[words == w].all(), f"row {b}: word {w} partly masked"
        budget = max(1, round(0.3 * n))
        longest = np.bincount(words).max()
        assert budget - longest < masked.sum() <= budget
    full = batch["labels"][:24] != -100
    assert full.sum().item() / (24 * 510) == pytest.approx(0.3, abs=0.01)


def test_80_10_10(big_batch):
    _, batch = big_batch
    masked = batch["labels"] != -100
    inputs, originals = batch["input_ids"][masked], batch["labels"][masked]
    total = masked.sum().item()
    as_mask = (inputs == MASK).sum().item() / total
    unchanged = (inputs == originals).sum().item() / total
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.015)
    assert 1 - as_mask - unchanged == pytest.approx(0.1, abs=0.015)
    assert (inputs[(inputs != MASK) & (inputs != originals)] < VOCAB).all()


def test_decoder_visibility_rules(big_batch):
    rows, batch = big_batch
    visible = batch["decoder_attention_mask"]
    assert visible.dtype == torch.bool and visible.shape == (len(rows), 512, 512)
    hidden_share = []
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        rows_b = visible[b]
        assert rows_b[:, 0].all()  # every row sees position 0
        for i in range(1, n + 1):
            assert not rows_b[i, i]  # never itself
        assert not rows_b[1:n + 1, n + 2:].any()  # never padding
        assert rows_b[1:n + 1, n + 1].all()  # [SEP] is never hidden
        targetless = [0] + list(range(n + 1, 512))
        assert (rows_b[targetless, 1:] == 0).all()  # rows without a target: position 0 only
        if n >= 100:
            words = word_index(row)
            content = rows_b[1:n + 1, 1:n + 1].clone()  # [n, n]
            for i in range(n):  # whole words: a word's other tokens are all hidden or all visible
                others = np.arange(n) != i
                seen = np.bincount(words[others], weights=content[i].numpy()[others], minlength=words[-1] + 1)
                size = np.bincount(words[others], minlength=words[-1] + 1)
                assert ((seen == 0) | (seen == size)).all(), f"row {b}, position {i}: a word is partly hidden"
            off_diagonal = ~torch.eye(n, dtype=torch.bool)
            hidden_share.append(1 - content[off_diagonal].float().mean().item())
    assert np.mean(hidden_share) == pytest.approx(0.5, abs=0.01)


def test_bow_targets_padded_with_zero_weight(big_batch):
    rows, batch = big_batch
    width = max(len(r["bow_ids"]) for r in rows)
    assert batch["bow_ids"].shape == batch["bow_weights"].shape == (len(rows), width)
    for b, row in enumerate(rows):
        k = len(row["bow_ids"])
        assert batch["bow_ids"][b, :k].tolist() == list(row["bow_ids"])
        assert torch.allclose(batch["bow_weights"][b, :k], torch.from_numpy(row["bow_weights"]))
        assert (batch["bow_weights"][b, k:] == 0).all()


def test_randomness_comes_only_from_the_generator():
    rows = rows_of([50, 80, 3], seed=2)
    first = collator()(rows, torch.Generator().manual_seed(11))
    torch.manual_seed(999)  # the global RNG must not matter
    again = collator()(rows, torch.Generator().manual_seed(11))
    other = collator()(rows, torch.Generator().manual_seed(12))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["labels"], other["labels"])
    assert not torch.equal(first["decoder_attention_mask"], other["decoder_attention_mask"])
    assert collator()(rows)["input_ids"].shape == first["input_ids"].shape  # no generator: global RNG


def test_rates_are_configurable():
    rows = rows_of([400] * 8, seed=3, start_probability=1.0)
    batch = collator(encoder_mlm_probability=0.15, decoder_mlm_probability=0.2, mask_token_probability=1.0,
                     random_token_probability=0.0)(rows, torch.Generator().manual_seed(0))
    masked = batch["labels"] != -100
    assert masked.sum().item() == 8 * 60  # single-token words: exactly round(0.15 * 400) per row
    assert (batch["input_ids"][masked] == MASK).all()
    content = batch["decoder_attention_mask"][:, 1:401, 1:401]
    assert 1 - content.float().mean().item() == pytest.approx(0.2 + 1 / 400, abs=0.01)


def test_bad_rows_fail_with_the_row_number():
    rows = rows_of([5, 30], seed=4)
    with pytest.raises(ValueError, match="row 1: input_ids has 30 tokens > max_seq_length - 2 = 14"):
        collator(max_seq_length=16)(rows)
    rows[0]["word_starts"] = rows[0]["word_starts"][:-1]
    with pytest.raises(ValueError, match="row 0: word_starts has 4 entries for 5 input_ids"):
        collator()(rows)
    rows = rows_of([5], seed=4)
    rows[0]["input_ids"][2] = VOCAB + 5
    with pytest.raises(ValueError, match="outside"):
        collator()(rows)


@pytest.mark.parametrize("kwargs", [dict(max_seq_length=2), dict(encoder_mlm_probability=1.5),
                                    dict(mask_token_probability=0.95, random_token_probability=0.1),
                                    dict(pad_to_multiple_of=0)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="CollatorConfig"):
        CollatorConfig(**kwargs)


def test_from_tokenizer(minilm_path):
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    built = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig())
    assert (built.cls_id, built.sep_id, built.pad_id, built.mask_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id)
    assert built.vocab_size == len(tokenizer)
    encoded = tokenizer("Unbelievably tokenized words", add_special_tokens=False)
    word_ids = encoded.word_ids()
    row = {"input_ids": encoded["input_ids"],
           "word_starts": [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(word_ids))],
           "bow_ids": sorted(set(encoded["input_ids"])), "bow_weights": [1.0] * len(set(encoded["input_ids"]))}
    batch = built([row], torch.Generator().manual_seed(0))
    text = tokenizer.decode(batch["decoder_input_ids"][0][batch["attention_mask"][0].bool()])
    assert text == "[CLS] unbelievably tokenized words [SEP]"
