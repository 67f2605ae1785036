"""pretrain.data: memory-mapped shards, disjoint per-rank shares, (seed, epoch) shuffling, exact resume, bad input.

Tiny shards are written here with pyarrow and the real packaged tokenizer (no Beam), exactly as the
preprocessing job lays them out (common.shard_format).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from common.shard_format import PRETRAIN_SCHEMA, Manifest, ShardInfo, shard_name
from common.tokenizer import load_tokenizer, vocab_hash
from pretrain.data import DataError, Prefetcher, PretrainShards, RankBatchLoader
from pretrain import shard_integrity
from pretrain.shard_integrity import VERIFIED_FILE, file_sha256, verify_shards

WORDS = ("retrieval encoder decoder masked language model dense sparse vector token sentence passage query "
         "document corpus training duplex bag words representation attention layer embedding").split()


def make_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + f" number {i}" for i in range(count)]


def write_shards(folder: Path, tokenizer, texts: list[str], *, num_shards: int = 3, max_seq_length: int = 64,
                 hash_override: str | None = None) -> Path:
    """Shards in the preprocessing job's layout: one row per text, no special tokens, uniform BoW weights."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(texts):
        encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_seq_length - 2)
        words = encoded.word_ids()
        ids = encoded["input_ids"]
        unique = sorted(set(ids))
        rows.append({"doc_id": f"doc{i}", "input_ids": ids,
                     "word_starts": [j == 0 or words[j] != words[j - 1] for j in range(len(ids))],
                     "bow_ids": unique, "bow_weights": [1.0 / len(unique)] * len(unique)})
    shards = []
    for index in range(num_shards):
        part = rows[index::num_shards]
        name = shard_name(index, num_shards)
        table = pa.Table.from_pylist(part, schema=PRETRAIN_SCHEMA)
        with pa.ipc.new_file(str(folder / name), PRETRAIN_SCHEMA) as writer:
            writer.write_table(table, max_chunksize=4)  # several record batches per shard
        shards.append(ShardInfo(file=name, rows=len(part), sha256=file_sha256(folder / name)))
    Manifest(kind="pretrain", tokenizer="test", vocab_hash=hash_override or vocab_hash(tokenizer),
             max_seq_length=max_seq_length, shards=shards, counts={"blocks": len(rows)}, options={}).write(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, make_texts(50))


def _plain_rows(folder: Path) -> list[dict]:
    """Reference: read every shard fully into memory, in manifest order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        with pa.OSFile(str(folder / shard["file"])) as handle:
            rows += pa.ipc.open_file(handle).read_all().to_pylist()
    return rows


def test_rows_match_a_plain_read(shard_dir, tokenizer):
    shards = PretrainShards(shard_dir, vocab_hash=vocab_hash(tokenizer))
    reference = _plain_rows(shard_dir)
    assert shards.num_rows == len(reference) == 50
    picked = np.array([49, 0, 17, 17, 3])
    assert shards.rows(picked) == [reference[i] for i in picked]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shares_are_disjoint_equal_and_cover_the_epoch(shard_dir, world_size):
    shards = PretrainShards(shard_dir)
    loaders = [RankBatchLoader(shards, batch_size=4, rank=r, world_size=world_size, seed=7) for r in range(world_size)]
    for epoch in (0, 1):
        shares = [set(loader.epoch_indices(epoch).tolist()) for loader in loaders]
        assert all(len(share) == 50 // world_size for share in shares)
        assert len(set().union(*shares)) == sum(len(share) for share in shares)  # pairwise disjoint
    assert len({loader.batches_per_epoch for loader in loaders}) == 1  # same number of steps on every rank
    # A whole epoch of batches: the share, without repeats.
    loader = loaders[-1]
    seen = [i for b in range(loader.batches_per_epoch) for i in loader.batch_indices(b).tolist()]
    assert len(seen) == len(set(seen)) == loader.batches_per_epoch * 4


def test_shuffle_is_seeded_by_seed_and_epoch(shard_dir):
    shards = PretrainShards(shard_dir)
    a = RankBatchLoader(shards, batch_size=4, rank=0, world_size=2, seed=7)
    b = RankBatchLoader(shards, batch_size=4, rank=0, world_size=2, seed=7)
    c = RankBatchLoader(shards, batch_size=4, rank=0, world_size=2, seed=8)
    assert np.array_equal(a.epoch_indices(0), b.epoch_indices(0))
    assert not np.array_equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not np.array_equal(a.epoch_indices(0), c.epoch_indices(0))
    # batch 6 of 6 per epoch wraps to epoch 1's first batch
    assert a.batches_per_epoch == 6 and np.array_equal(a.batch_indices(6), a.epoch_indices(1)[:4])


def test_resume_jumps_to_the_position_without_reading_seen_batches(shard_dir):
    shards = PretrainShards(shard_dir)
    straight = RankBatchLoader(shards, batch_size=4, rank=1, world_size=2, seed=3)
    expected = [straight.read(position) for position in range(10)]  # crosses an epoch boundary (6 per epoch)
    first = RankBatchLoader(shards, batch_size=4, rank=1, world_size=2, seed=3)
    for position in range(7):
        first.read(position)
        first.consumed(position)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization

    reads = []
    resumed = RankBatchLoader(shards, batch_size=4, rank=1, world_size=2, seed=3)
    original = shards.rows
    shards.rows = lambda indices: reads.append(indices.tolist()) or original(indices)
    try:
        resumed.load_state_dict(state)
        assert reads == []  # loading the position reads nothing
        start = resumed.state.micro_batches
        assert start == 7 and [resumed.read(p) for p in range(start, start + 3)] == expected[7:]
    finally:
        del shards.rows
    assert len(reads) == 3  # exactly the three new batches were read


def test_prefetcher_keeps_order_and_raises_the_threads_error():
    batches = Prefetcher(lambda position: position * position, start=3, depth=2)
    assert [batches.next() for _ in range(4)] == [(3, 9), (4, 16), (5, 25), (6, 36)]
    batches.close()

    def make(position):
        if position == 2:
            raise ValueError("row 5: bad")
        return position

    failing = Prefetcher(make, start=0)
    assert failing.next() == (0, 0) and failing.next() == (1, 1)
    with pytest.raises(ValueError, match="row 5: bad"):
        failing.next()
    failing.close()


def test_resume_refuses_another_split(shard_dir):
    shards = PretrainShards(shard_dir)
    state = RankBatchLoader(shards, batch_size=4, rank=0, world_size=2, seed=3).state_dict()
    with pytest.raises(DataError, match="world_size=2"):
        RankBatchLoader(shards, batch_size=4, rank=0, world_size=3, seed=3).load_state_dict(state)


def test_bad_data_dirs_fail_with_one_clear_line(tmp_path, shard_dir, tokenizer):
    with pytest.raises(DataError, match="no such folder"):
        PretrainShards(tmp_path / "absent")
    with pytest.raises(DataError, match="no manifest"):
        PretrainShards(tmp_path)
    other = write_shards(tmp_path / "other_vocab", tokenizer, make_texts(8), hash_override="0" * 64)
    with pytest.raises(DataError, match="vocab_hash 000000000000.*differs") as info:
        PretrainShards(other, vocab_hash=vocab_hash(tokenizer))
    assert "\n" not in str(info.value)
    broken = write_shards(tmp_path / "broken", tokenizer, make_texts(8), num_shards=2)
    pa.ipc.new_file(str(broken / shard_name(1, 2)), pa.schema([("doc_id", pa.string())])).close()
    with pytest.raises(DataError, match=r"shard-00001-of-00002.arrow: column 'input_ids' is missing"):
        PretrainShards(broken)
    (broken / shard_name(0, 2)).unlink()
    with pytest.raises(DataError, match="shard-00000-of-00002.arrow: listed in manifest.json but missing"):
        PretrainShards(broken)



def change_one_byte(path: Path) -> None:
    """A doc id's last digit changed in place: the file still opens with the same schema and rows."""
    data = bytearray(path.read_bytes())
    at = data.index(b"doc1") + 3
    data[at] = ord("7")
    path.write_bytes(bytes(data))


def test_a_changed_byte_fails_the_hash_and_a_truncated_shard_fails_to_open(tmp_path, tokenizer):
    folder = write_shards(tmp_path / "data", tokenizer, make_texts(12), num_shards=3)
    change_one_byte(folder / shard_name(1, 3))
    shards = PretrainShards(folder)  # size, schema and rows cannot see it
    with pytest.raises(DataError, match=r"shard-00001-of-00003.arrow: sha256 \w{16}\.\.\. differs from manifest.json's") \
            as info:
        verify_shards(folder, shards.manifest, tmp_path / "out", rank=0, world_size=1)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / VERIFIED_FILE).exists()
    truncated = write_shards(tmp_path / "truncated", tokenizer, make_texts(12), num_shards=3)
    path = truncated / shard_name(2, 3)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"shard-00002-of-00003.arrow: not a complete Arrow IPC file") as info:
        PretrainShards(truncated)
    assert "\n" not in str(info.value)


def test_verification_is_recorded_and_redone_only_when_the_files_change(tmp_path, tokenizer, monkeypatch):
    folder = write_shards(tmp_path / "data", tokenizer, make_texts(12), num_shards=3)
    manifest = PretrainShards(folder).manifest
    hashed = []
    original = shard_integrity.file_sha256
    monkeypatch.setattr(shard_integrity, "file_sha256", lambda path: hashed.append(path.name) or original(path))
    verify_shards(folder, manifest, tmp_path / "out", rank=0, world_size=1)
    assert hashed == [shard_name(i, 3) for i in range(3)]
    verify_shards(folder, manifest, tmp_path / "out", rank=0, world_size=1)  # a resume: the record says done
    assert len(hashed) == 3
    stat = (folder / shard_name(0, 3)).stat()
    os.utime(folder / shard_name(0, 3), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a copy made again
    verify_shards(folder, manifest, tmp_path / "out", rank=0, world_size=1)
    assert len(hashed) == 6
    # a byte changed and the mtime put back (as cp -p or rsync -a leave a bad copy): hashed again, and caught
    stat = (folder / shard_name(2, 3)).stat()
    change_one_byte(folder / shard_name(2, 3))
    os.utime(folder / shard_name(2, 3), ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"shard-00002-of-00003.arrow: sha256"):
        verify_shards(folder, manifest, tmp_path / "out", rank=0, world_size=1)
    assert len(hashed) == 9
    # rank 1 of 2 hashes shards 1 only (rank 0 takes 0 and 2); without a process group nothing is gathered
    hashed.clear()
    verify_shards(folder, manifest, tmp_path / "out2", rank=1, world_size=2)
    assert hashed == [shard_name(1, 3)] and not (tmp_path / "out2" / VERIFIED_FILE).exists()

def _verify_worker(rank: int, port: int, folders: list[str], outs: list[str], results: str) -> None:
    """Rank `rank` of 2 verifies its own copy of the shards into its own output folder (nothing shared); it
    reports the shards it hashed. A short collective timeout turns a desynchronised pair into an error."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=10))
    hashed = []
    original = shard_integrity.file_sha256
    shard_integrity.file_sha256 = lambda path: hashed.append(path.name) or original(path)
    folder = Path(folders[rank])
    verify_shards(folder, PretrainShards(folder).manifest, outs[rank], rank=rank, world_size=2)
    dist.barrier()
    torch.save(hashed, Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank_0_alone_decides_to_skip_a_verification_done_before(tmp_path, tokenizer):
    """Rank 0 has a record of its shards; rank 1 reads a node-local copy (another path, other mtimes) and has no
    record in its own output folder. Both skip, as rank 0 decided; neither waits for the other."""
    import torch

    folder = write_shards(tmp_path / "data", tokenizer, make_texts(12), num_shards=3)
    verify_shards(folder, PretrainShards(folder).manifest, tmp_path / "out0", rank=0, world_size=1)  # the record
    local = shutil.copytree(folder, tmp_path / "node1" / "data", copy_function=shutil.copy)  # new mtimes
    torch.multiprocessing.spawn(_verify_worker, nprocs=2, join=True, args=(
        29900 + os.getpid() % 90, [str(folder), str(local)], [str(tmp_path / "out0"), str(tmp_path / "out1")],
        str(tmp_path)))
    assert [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)] == [[], []]


def test_too_little_data_for_one_batch_per_rank(shard_dir):
    with pytest.raises(DataError, match="cannot fill one batch of 32 on each of 2 ranks"):
        RankBatchLoader(PretrainShards(shard_dir), batch_size=32, rank=0, world_size=2, seed=0)


def test_log_unigram_prior_counts_the_shards_tokens(shard_dir, tokenizer):
    vocab = len(tokenizer)
    counts = np.zeros(vocab)
    for row in _plain_rows(shard_dir):
        for token in row["input_ids"]:
            counts[token] += 1
    prior = PretrainShards(shard_dir).log_unigram_prior(vocab)
    np.testing.assert_allclose(prior, np.log((counts + 1) / (counts.sum() + vocab)), rtol=1e-12)
    assert np.exp(prior).sum() == pytest.approx(1.0)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        PretrainShards(shard_dir).log_unigram_prior(100)


@pytest.mark.parametrize("micro_batches,accumulation,epochs", [(10, 4, 1.0), (10, 4, 3.0), (7, 2, 2.0), (12, 4, 1.0),
                                                               (9, 1, 1.0)])
def test_whole_epochs_never_read_into_the_next_epoch(micro_batches, accumulation, epochs):
    """`--num_train_epochs N` (how pretrain/main.py sizes the schedule): at most N epochs' micro-batches, and all of
    them when accumulation divides an epoch."""
    from pretrain.arguments import TrainingArguments

    args = TrainingArguments(output_dir="/o", num_train_epochs=epochs, gradient_accumulation_steps=accumulation)
    read = args.total_steps(micro_batches / accumulation) * accumulation
    assert read <= epochs * micro_batches
    assert read == epochs * micro_batches - epochs * (micro_batches % accumulation)
