"""Collator throughput: our whole-batch DupMAECollator vs a per-sample re-implementation of the official one.

    python benchmarks/collator.py [--batch_size 32] [--seq_len 512] [--batches 10] [--baseline_batches 1] [--smoke]

The baseline re-implements, in plain Python, the algorithm of the official DupMAECollator
(staoxiao/RetroMAE, src/pretrain/data.py, on top of transformers 4's DataCollatorForWholeWordMask):
per sample, token strings from the ids, a greedy whole-word mask over shuffled "##"-grouped candidates
for the encoder, min(n, 256) more such masks for the decoder, one deep-copied mask per row with the row's
own position set, a dense vocabulary-size BoW vector filled by a Python loop, then padding and BERT's
80/10/10. Both run on one CPU thread on the same blocks (Gutenberg text from ../shared/data when present,
else random token ids). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import smoke  # noqa: E402
from common.tokenizer import load_tokenizer  # noqa: E402
from pretrain.collator import CollatorConfig, DupMAECollator  # noqa: E402

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg" / "books-25MB.jsonl"


class OfficialStyleCollator:
    """The official DupMAECollator's algorithm, sample by sample (the baseline; not used by the project)."""

    def __init__(self, tokenizer, max_seq_length: int, encoder_p: float = 0.3, decoder_p: float = 0.5):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.encoder_p, self.decoder_p = encoder_p, decoder_p

    def whole_word_mask(self, tokens: list[str], probability: float, max_predictions: int = 512) -> list[int]:
        groups: list[list[int]] = []
        for i, token in enumerate(tokens):
            if token in (self.tokenizer.cls_token, self.tokenizer.sep_token):
                continue
            if groups and token.startswith("##"):
                groups[-1].append(i)
            else:
                groups.append([i])
        random.shuffle(groups)
        budget = min(max_predictions, max(1, int(round(len(tokens) * probability))))
        covered: set[int] = set()
        for group in groups:
            if len(covered) >= budget:
                break
            if len(covered) + len(group) > budget or any(i in covered for i in group):
                continue
            covered.update(group)
        return [1 if i in covered else 0 for i in range(len(tokens))]

    def mask_tokens(self, inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        labels = inputs.clone()
        special = torch.tensor([tok.get_special_tokens_mask(r, already_has_special_tokens=True)
                                for r in labels.tolist()], dtype=torch.bool)
        masked = mask.bool() & ~special & (inputs != tok.pad_token_id)
        labels[~masked] = -100
        replaced = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & masked
        inputs[replaced] = tok.mask_token_id
        randomized = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & masked & ~replaced
        inputs[randomized] = torch.randint(len(tok), labels.shape, dtype=torch.long)[randomized]
        return inputs, labels

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        target_len = self.max_seq_length - 2
        ids_b, enc_masks, dec_labels, dec_masks, bows = [], [], [], [], []
        for example in examples:
            body = list(example["token_ids"][:target_len])
            ids = [tok.cls_token_id] + body + [tok.sep_token_id]
            tokens = tok.convert_ids_to_tokens(ids)
            enc_masks.append(self.whole_word_mask(tokens, self.encoder_p))
            n_masks = min(len(tokens), 256)
            mask_set = [self.whole_word_mask(tokens, self.decoder_p) for _ in range(n_masks)]
            rows = []
            for i in range(len(tokens)):
                row = deepcopy(mask_set[random.randint(0, n_masks - 1)])
                row[i] = 1
                rows.append(row)
            ids_b.append(ids)
            dec_labels.append([-100] + body + [-100])
            dec_masks.append(1 - torch.tensor(rows))
            weight = torch.zeros(tok.vocab_size)
            for t in body:
                weight[t] = 1 / len(body)
            bows.append(weight[None])
        length = max(len(ids) for ids in ids_b)
        input_ids = torch.full((len(ids_b), length), tok.pad_token_id)
        attention = torch.zeros(len(ids_b), length, dtype=torch.long)
        encoder_mask = torch.zeros(len(ids_b), length, dtype=torch.long)
        decoder_labels = torch.full((len(ids_b), length), -100)
        matrix = torch.zeros(len(ids_b), length, length, dtype=torch.long)
        for b, ids in enumerate(ids_b):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention[b, :len(ids)] = 1
            encoder_mask[b, :len(ids)] = torch.tensor(enc_masks[b])
            decoder_labels[b, :len(ids)] = torch.tensor(dec_labels[b])
            matrix[b, :len(ids), :len(ids)] = dec_masks[b]
        originals = input_ids.clone()
        encoder_ids, encoder_labels = self.mask_tokens(input_ids, encoder_mask)
        return {"encoder_input_ids": encoder_ids, "encoder_attention_mask": attention, "encoder_labels": encoder_labels,
                "decoder_input_ids": originals, "decoder_attention_mask": matrix, "decoder_labels": decoder_labels,
                "bag_word_weight": torch.cat(bows)}


def make_blocks(tokenizer, n_blocks: int, block_len: int, seed: int) -> list[dict]:
    """Shard-like rows of block_len tokens: input_ids, word_starts, bow_ids, bow_weights."""
    rng = np.random.default_rng(seed)
    if BOOKS.is_file():
        with BOOKS.open() as f:
            text = " ".join(json.loads(line)["text"] for _, line in zip(range(3), f))
        encoded = tokenizer(text[: n_blocks * block_len * 8], add_special_tokens=False, verbose=False)
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        word_ids = np.asarray([-1 if w is None else w for w in encoded.word_ids()])
        starts = np.r_[True, word_ids[1:] != word_ids[:-1]]
    else:  # random ids; "##" tokens make word continuations as in real text
        ids = rng.integers(1000, tokenizer.vocab_size, n_blocks * block_len).astype(np.int32)
        starts = ~np.char.startswith(np.asarray(tokenizer.convert_ids_to_tokens(ids.tolist())), "##")
    if len(ids) < n_blocks * block_len:
        raise SystemExit(f"only {len(ids)} tokens of text for {n_blocks} blocks of {block_len}")
    rows = []
    for b in range(n_blocks):
        part = slice(b * block_len, (b + 1) * block_len)
        unique = np.unique(ids[part])
        rows.append({"input_ids": ids[part], "word_starts": starts[part].copy(), "bow_ids": unique.astype(np.int32),
                     "bow_weights": np.full(len(unique), 1 / len(unique), dtype=np.float32)})
    return rows


def samples_per_second(fn, batches: list[list[dict]], warm_up: bool) -> float:
    if warm_up:
        fn(batches[0])
    start = time.perf_counter()
    for rows in batches:
        fn(rows)
    return sum(len(rows) for rows in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=10, help="timed batches for our collator")
    parser.add_argument("--baseline_batches", type=int, default=1, help="timed batches for the baseline (slow)")
    parser.add_argument("--model_name_or_path", default=None, help="tokenizer (default: the packaged MiniLM)")
    args = smoke.parse_args(parser, batch_size=2, seq_len=64, batches=1, baseline_batches=1)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model_name_or_path)
    n_batches = max(args.batches, args.baseline_batches)
    rows = make_blocks(tokenizer, args.batch_size * n_batches, args.seq_len - 2, seed=0)
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    ours = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig(max_seq_length=args.seq_len))
    generator = torch.Generator().manual_seed(0)
    ours_rate = samples_per_second(lambda r: ours(r, generator), batches[:args.batches], warm_up=True)
    random.seed(0)
    official = OfficialStyleCollator(tokenizer, args.seq_len)
    examples = [[{"token_ids": row["input_ids"].tolist()} for row in batch] for batch in batches]
    baseline_rate = samples_per_second(official, examples[:args.baseline_batches], warm_up=False)
    print(json.dumps({"bench": "collator", "metric": "throughput", "unit": "samples/s", "ours": round(ours_rate, 2),
                      "baseline": round(baseline_rate, 2), "ratio": round(ours_rate / baseline_rate, 2),
                      "better": "higher", "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": 1,
                      "data": "gutenberg" if BOOKS.is_file() else "random ids", "smoke": args.smoke}))


if __name__ == "__main__":
    main()
