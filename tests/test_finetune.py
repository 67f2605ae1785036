"""finetune: the loss against a plain reference, cross-device negatives against one process (with and without a
teacher's scores), data sampling and bad input, mining, export round trips, the dupmae training score, and exact
resume of a real (tiny) run; the 2-rank crash-and-resume run distils from a teacher file."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from common.representation import Encoder, RepresentationConfig
from finetune.config import FinetuneConfig
from finetune.data import Collator, DeadLetter, GroupSampler, TrainGroup, load_beir, read_negatives
from finetune.loss import info_nce, positive_labels
from finetune.model import BiEncoder
from test_pretrain_train import kill_between_checkpoints, kill_during_checkpoint_write, same_partitions

REPO = Path(__file__).resolve().parents[1]
KINDS = ("mean", "dupmae")
WORDS = ["protein", "cell", "gene", "virus", "cancer", "brain", "heart", "drug", "dose", "mouse", "risk", "blood"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT with an MLM head (dupmae needs one) and the packaged tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(tokenizer), max_position_embeddings=64)
    out = tmp_path_factory.mktemp("tiny_model")
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> Path:
    """30 documents, 12 training queries with one or two positives each."""
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("beir")
    (out / "qrels").mkdir()
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choices(WORDS, k=12))} for i in range(30)]
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choices(WORDS, k=4))} for i in range(12)]
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{2 * i}\t1" for i in range(12)] + ["q0\td1\t1", "q1\td5\t0"]
    (out / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    return out


def config(**overrides) -> FinetuneConfig:
    return replace(FinetuneConfig(data_dir="x", output_dir="x", deepspeed="x"), **overrides)


def test_info_nce_equals_reference_loop():
    torch.manual_seed(0)
    scores, group, tau, offset = torch.randn(3, 12), 2, 0.05, 4
    expected = 0.0
    for i in range(3):
        logits = [s / tau for s in scores[i].tolist()]
        expected -= logits[offset + i * group] - math.log(sum(math.exp(x) for x in logits))
    loss = info_nce(scores, positive_labels(3, group, offset), tau)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


def _tiny_batch(tokenizer, n_queries: int, group: int, seed: int):
    rng = random.Random(seed)
    collator = Collator(tokenizer, 16, 24)
    return collator([" ".join(rng.choices(WORDS, k=3)) for _ in range(n_queries)],
                    [" ".join(rng.choices(WORDS, k=rng.randint(2, 10))) for _ in range(n_queries * group)])


def _slice(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


#: Teacher scores of the 4 queries' groups of 2 in the cross-device test (distillation across ranks, issue 31).
TEACHER = torch.tensor([[2.0, -1.0], [0.5, 0.0], [-3.0, 1.0], [1.0, 1.5]])


#: (representation, with teacher scores, --official_cross_device) of the 2-rank test.
CROSS_DEVICE_CASES = [(kind, teacher, False) for kind in KINDS for teacher in (False, True)] + [("mean", True, True)]


def _cross_device_worker(rank: int, model_dir: str, port: int, out: str) -> None:
    """Rank `rank` of 2: its half of the batch with cross-device negatives, without and with teacher scores (KL +
    0.5 x InfoNCE), and once as the official code computes it; saves the rank-mean loss and gradients."""
    import torch.distributed as dist

    from common.tokenizer import load_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    query, passage = _tiny_batch(load_tokenizer(model_dir), 4, 2, seed=1)
    results = {}
    for kind, with_teacher, official in CROSS_DEVICE_CASES:
        model = BiEncoder.from_config(config(model_name_or_path=model_dir, representation=kind, top_k=8,
                                             train_group_size=2, cross_device_negatives=True,
                                             contrastive_loss_weight=0.5, official_cross_device=official)).eval()
        teacher = TEACHER[2 * rank:2 * rank + 2] if with_teacher else None
        output = model(_slice(query, 2 * rank, 2 * rank + 2), _slice(passage, 4 * rank, 4 * rank + 4), teacher)
        output.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for g in grads.values():  # what DeepSpeed does: average the ranks' gradients
            dist.all_reduce(g)
            g /= 2
        loss = output.loss.detach().clone()
        dist.all_reduce(loss)
        results[kind, with_teacher, official] = {"loss": loss / 2, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_cross_device_negatives_equal_one_process(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "ranks.pt"
    torch.multiprocessing.spawn(_cross_device_worker, args=(str(tiny_model), 29400 + os.getpid() % 500, str(out)),
                                nprocs=2, join=True)
    results = torch.load(out)
    query, passage = _tiny_batch(tokenizer, 4, 2, seed=1)
    for kind, with_teacher, official in CROSS_DEVICE_CASES:
        # official: the same loss; the InfoNCE gradient halved (1/world size), the KL's not
        model = BiEncoder.from_config(config(model_name_or_path=str(tiny_model), representation=kind, top_k=8,
                                             train_group_size=2, contrastive_loss_weight=0.25 if official else 0.5)
                                      ).eval()
        output = model(query, passage, TEACHER if with_teacher else None)
        output.loss.backward()
        ranks = results[kind, with_teacher, official]
        expected = output.distill + 0.5 * output.contrastive if with_teacher else output.contrastive
        assert ranks["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ranks["grads"].keys()
        for name, grad in grads.items():
            scale = grad.abs().max().item()  # float32 sums in another order: tolerance relative to the tensor's scale
            torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-4, atol=1e-4 * scale + 1e-7,
                                       msg=lambda m, kind=kind, name=name: f"{kind}: {name}: {m}")


def test_dupmae_training_score_equals_dense_recomputation(tiny_model, tokenizer):
    model = BiEncoder.from_config(config(model_name_or_path=str(tiny_model), representation="dupmae", top_k=5,
                                         train_group_size=2, temperature=0.1)).eval()
    query, passage = _tiny_batch(tokenizer, 3, 2, seed=2)
    output = model(query, passage)
    q, p = model.query_encoder(**query), model.query_encoder(**passage)
    kept = torch.zeros_like(p.vocab)
    for row in range(len(kept)):  # the document keeps its 5 largest vocabulary entries
        top = sorted(range(p.vocab.shape[1]), key=lambda i: -p.vocab[row, i].item())[:5]
        kept[row, top] = p.vocab[row, top]
    expected = torch.cat([q.dense, q.vocab], 1) @ torch.cat([p.dense, kept], 1).T
    torch.testing.assert_close(output.scores, expected.detach(), rtol=1e-5, atol=1e-5)
    output.loss.backward()  # the loss trains the [CLS] projection and the MLM head too
    assert model.query_encoder.projection.weight.grad.abs().sum() > 0
    head = model.query_encoder.model.cls.predictions.transform.dense.weight
    assert head.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,normalize", [("mean", True), ("cls", False), ("dupmae", False)])
def test_export_round_trip(tiny_model, tokenizer, tmp_path, kind, normalize):
    model = BiEncoder.from_config(config(model_name_or_path=str(tiny_model), representation=kind,
                                         normalize=normalize, untie_encoders=True)).eval()
    with torch.no_grad():  # make the two towers differ, as training would
        next(model.passage_encoder.parameters()).add_(0.01)
    folders = model.export(tmp_path / "model", tokenizer)
    assert [f.name for f in folders] == ["query", "passage"]
    query, passage = _tiny_batch(tokenizer, 3, 1, seed=3)
    for folder, encoder, batch in zip(folders, (model.query_encoder, model.passage_encoder), (query, passage)):
        loaded = Encoder.from_pretrained(str(folder)).eval()
        assert loaded.config == RepresentationConfig(kind, normalize)
        with torch.no_grad():
            before, after = encoder(**batch), loaded(**batch)
        torch.testing.assert_close(after.dense, before.dense)
        if kind == "dupmae":
            torch.testing.assert_close(after.vocab, before.vocab)
    from sentence_transformers import SentenceTransformer  # the dense half (dupmae's sparse half: test_st_loaders)

    texts = ["gene risk in mice", "blood dose"]
    st = SentenceTransformer(str(folders[1]), device="cpu").encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        ours = model.passage_encoder(**Collator(tokenizer, 32, 32).encode(texts, 32)).dense
    torch.testing.assert_close(st, ours, rtol=1e-4, atol=1e-5)


def test_sampler_is_seeded_per_epoch_and_never_draws_positives():
    groups = [TrainGroup(f"q{i}", [f"p{i}"], [f"n{i}-{j}" for j in range(i % 4)]) for i in range(12)]
    corpus = [f"p{i}" for i in range(12)] + [f"n{i}-{j}" for i in range(12) for j in range(i % 4)]
    whole = GroupSampler(groups, corpus, 3, 4, rank=0, world_size=1, seed=7)
    ranks = [GroupSampler(groups, corpus, 3, 2, rank=r, world_size=2, seed=7) for r in range(2)]
    assert whole.steps_per_epoch == 3
    for epoch in range(2):
        for step in range(3):
            batch = whole.batch(epoch, step)
            assert batch == ranks[0].batch(epoch, step) + ranks[1].batch(epoch, step)
            assert batch == GroupSampler(groups, corpus, 3, 4, 0, 1, seed=7).batch(epoch, step)
            for query_id, passages in batch:
                index = int(query_id[1:])
                assert passages[0] == f"p{index}" and len(passages) == 3
                assert all(p != f"p{index}" for p in passages[1:])  # random fallback never draws the positive
                if index % 4:
                    assert all(p.startswith(f"n{index}-") for p in passages[1:])
    assert whole.batch(0, 0) != whole.batch(1, 0)
    assert whole.batch(0, 0) != GroupSampler(groups, corpus, 3, 4, 0, 1, seed=8).batch(0, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GroupSampler(groups, corpus, 3, 8, rank=0, world_size=2, seed=0)


def test_bad_input_goes_to_dead_letter(beir_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "qrels").mkdir()
    lines = (beir_dir / "corpus.jsonl").read_text().splitlines()
    (folder / "corpus.jsonl").write_text("\n".join(lines[:3] + ['{"_id": "x"', '{"_id": 5, "text": "t"}']) + "\n")
    (folder / "queries.jsonl").write_text((beir_dir / "queries.jsonl").read_text())
    (folder / "qrels" / "train.tsv").write_text("q0\td0\t1\nq1\td1\tyes\nq2\tmissing\t1\nq3\td2\t1\n")
    negatives = tmp_path / "negs.jsonl"
    negatives.write_text('{"query_id": "q0", "negatives": ["d0", "d1", "nope", "d1", "d2"]}\n'
                         '{"query_id": "q3", "negatives": "d1"}\n')
    dead = DeadLetter(tmp_path / "dead.jsonl")
    data = load_beir(folder, "train", str(negatives), dead)
    assert [(g.query_id, g.positives, g.negatives) for g in data.groups] == [("q0", ["d0"], ["d1", "d2"]),
                                                                             ("q3", ["d2"], [])]
    records = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert dead.count == len(records) == 5
    reasons = {(Path(r["source"]).name, r["line"]): r["reason"] for r in records}
    assert reasons[("corpus.jsonl", 4)].startswith("invalid JSON")
    assert reasons[("corpus.jsonl", 5)] == "field '_id' must be str"
    assert reasons[("train.tsv", 2)].startswith("expected 'query-id")
    assert "'missing'" in reasons[("train.tsv", 3)]
    assert reasons[("negs.jsonl", 2)] == "field 'negatives' must be a list of strings"


def test_deepspeed_auto_values(tmp_path):
    from finetune.trainer import deepspeed_config

    path = REPO / "ds_configs" / "finetune_cpu.json"
    filled = deepspeed_config(config(deepspeed=str(path), per_device_train_batch_size=4, learning_rate=3e-5,
                                     gradient_accumulation_steps=2), world_size=2, total_steps=50)
    assert filled["train_batch_size"] == 16 and filled["optimizer"]["params"]["lr"] == 3e-5
    assert "scheduler" not in filled  # the trainer's own: HF's schedule (common.schedule)
    assert "auto" not in json.dumps(filled)
    own = tmp_path / "own_scheduler.json"  # a JSON that brings a DeepSpeed scheduler gets its "auto" values
    own.write_text(json.dumps({**json.loads(path.read_text()), "scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_max_lr": "auto"}}}))
    params = deepspeed_config(config(deepspeed=str(own), warmup_ratio=0.05), world_size=1, total_steps=50)[
        "scheduler"]["params"]
    assert params == {"total_num_steps": 50, "warmup_num_steps": 3, "warmup_max_lr": 2e-5}  # ceil(2.5), as HF
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 3"):
        deepspeed_config(config(deepspeed=str(bad)), world_size=1, total_steps=1)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_mined_negatives_are_ranked_and_never_positive(tiny_model, tokenizer, beir_dir, tmp_path):
    out = tmp_path / "negs.jsonl"
    subprocess.run([sys.executable, "-m", "finetune.mine_negatives", "--model", str(tiny_model), "--data_dir",
                    str(beir_dir), "--out", str(out), "--representation", "mean", "--depth", "10", "--skip_top", "2"],
                   check=True, env=_env(), cwd=REPO)
    mined = read_negatives(out, DeadLetter(None))
    data = load_beir(beir_dir, "train", None, DeadLetter(None))
    assert set(mined) == {g.query_id for g in data.groups}
    encoder = Encoder.from_pretrained(str(tiny_model), RepresentationConfig("mean")).eval()
    collator = Collator(tokenizer, 32, 144)
    doc_ids = list(data.corpus)
    with torch.no_grad():  # reference: one text at a time, no padding
        docs = torch.cat([encoder(**collator.encode([data.corpus[d]], 144)).dense for d in doc_ids])
        for group in data.groups:
            query = encoder(**collator.encode([data.queries[group.query_id]], 32)).dense[0]
            ranked = [doc_ids[i] for i in (docs @ query).argsort(descending=True)[:10].tolist()]
            expected = [d for d in ranked if d not in group.positives][2:]
            assert mined[group.query_id] == expected
            assert not set(mined[group.query_id]) & set(group.positives)


def test_bm25_mining(beir_dir, tmp_path):
    pytest.importorskip("bm25s")
    from finetune.mine_negatives import MiningConfig, mine

    beir = load_beir(beir_dir, "train", None, DeadLetter(None))
    mined = mine(MiningConfig(data_dir=str(beir_dir), out=str(tmp_path / "n.jsonl"), method="bm25", depth=8,
                              skip_top=0))
    assert mined == read_negatives(tmp_path / "n.jsonl", DeadLetter(None))
    for group in beir.groups:
        assert 0 < len(mined[group.query_id]) <= 8 and not set(mined[group.query_id]) & set(group.positives)


@pytest.mark.slow
def test_resume_is_exact(tiny_model, beir_dir, tmp_path):
    negatives = tmp_path / "negs.jsonl"
    negatives.write_text("".join(json.dumps({"query_id": f"q{i}", "negatives": [f"d{j}" for j in range(30)]}) + "\n"
                                 for i in range(12)))

    def run(out: Path, *extra: str) -> list[dict]:
        subprocess.run([sys.executable, "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json",
                        "--model_name_or_path", str(tiny_model), "--data_dir", str(beir_dir), "--output_dir",
                        str(out), "--negatives", str(negatives), "--train_group_size", "3",
                        "--per_device_train_batch_size", "4", "--max_steps", "5", "--save_steps", "2",
                        "--logging_steps", "1", "--learning_rate", "1e-3", "--representation", "dupmae", "--top_k",
                        "16", "--passage_max_length", "24", *extra], check=True, env=_env(), cwd=REPO)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    assert [m["step"] for m in full] == [1, 2, 3, 4, 5] and [m["epoch"] for m in full] == [0, 0, 0, 1, 1]
    # the logged lr (the next step's) is HF Trainer's schedule step for step: ceil(0.1 x 5) = 1 warm-up step
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    hf = get_linear_schedule_with_warmup(reference, num_warmup_steps=1, num_training_steps=5)
    for record in full:
        reference.step()
        hf.step()
        assert record["lr"] == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-15), record["step"]
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "full/checkpoints/step-00000002"))
    assert [m["step"] for m in resumed] == [3, 4, 5]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"]
    before = Encoder.from_pretrained(str(tmp_path / "full/model")).state_dict()
    after = Encoder.from_pretrained(str(tmp_path / "resumed/model")).state_dict()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_ranks(model: Path, data: Path, out: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of the real `deepspeed` launcher with 2 CPU ranks (gloo), 2 queries of 3 passages
    per rank, a log line per step."""
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
               str(_free_port()), "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json",
               "--model_name_or_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
               "--train_group_size", "3", "--per_device_train_batch_size", "2", "--passage_max_length", "24",
               "--logging_steps", "1", "--learning_rate", "1e-3", *extra]
    return command, {**_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def launch_two_ranks(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command, env = two_ranks(model, data, out, *extra)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_resume_on_another_number_of_ranks_is_one_line_and_exit_2(tiny_model, beir_dir, tmp_path):
    """A 1-rank checkpoint resumed by 2 ranks: one line on each rank and exit 2, before any rank reads it (rank 1
    used to fail in load_rank_state, rank 0 in DeepSpeed's ZeRO check: tracebacks). A shrunk world: the
    pre-training test of the same name (the same check, in common/checkpoint.py)."""
    command, env = two_ranks(tiny_model, beir_dir, tmp_path / "one", "--max_steps", "1", "--save_steps", "1")
    one = [sys.executable, *command[command.index("finetune/main.py"):]]  # a world of one, without the launcher
    subprocess.run(one, env=env, cwd=REPO, capture_output=True, check=True, timeout=300)
    checkpoint = tmp_path / "one" / "checkpoints" / "step-00000001"
    done = launch_two_ranks(tiny_model, beir_dir, tmp_path / "two", "--max_steps", "2", "--resume_from_checkpoint",
                            str(checkpoint))
    log = done.stdout + done.stderr
    line = (f"--resume_from_checkpoint {checkpoint}: written by 1 rank, this run has 2; a checkpoint resumes only "
            "on the number of ranks that wrote it (ZeRO splits the optimizer state and the data by rank)")
    assert done.returncode == 2 and log.count(line) == 2 and "Traceback" not in log, log[-4000:]
    assert not (tmp_path / "two" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_both_and_a_run_of_them_stops(tiny_model, tokenizer, beir_dir, tmp_path):
    """A model whose embedding of one word is 1e30 (finite; its LayerNorm gives NaN) and queries holding that word:
    a step is skipped on both ranks exactly when some rank's batch holds one (the sampler is the reference), and
    the run stops at the second skip in a row (--max_consecutive_nonfinite 2)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids("zebra")] = 1e30
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "beir"
    shutil.copytree(beir_dir, data)
    poisoned = {"q7", "q10"}
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines()]
    (data / "queries.jsonl").write_text("".join(
        json.dumps({**q, "text": q["text"] + " zebra" if q["_id"] in poisoned else q["text"]}) + "\n"
        for q in queries))
    loaded = load_beir(data, "train", None, DeadLetter(None))
    samplers = [GroupSampler(loaded.groups, list(loaded.corpus), 3, 2, rank, 2, seed=42) for rank in (0, 1)]
    per_epoch = samplers[0].steps_per_epoch
    expected, in_a_row = [], 0
    for step in range(1, 10):  # the reference: skipped iff a batch of either rank holds a poisoned query
        batches = [s.batch(*divmod(step - 1, per_epoch)) for s in samplers]
        expected.append(any(q in poisoned for batch in batches for q, _ in batch))
        in_a_row = in_a_row + 1 if expected[-1] else 0
        if in_a_row == 2:
            break
    assert expected == [False, True, False, True, True]  # a skip, a step, then two skips: stop at step 5

    out = tmp_path / "out"
    done = launch_two_ranks(tmp_path / "model", data, out, "--max_steps", "9", "--save_steps", "1",
                            "--max_consecutive_nonfinite", "2")
    log = done.stdout + done.stderr
    assert done.returncode == 3, log[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [not math.isfinite(r["loss"]) for r in records] == expected
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 2 and all("stopping at step 5: 2 optimizer steps in a row" in e for e in errors)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [f"step-{s:08d}" for s in range(1, 5)]
    assert not (out / "model").exists()
    # skipped steps change neither rank's optimizer partition (fp32 masters, AdamW step and moments)
    for before, after, same in ((1, 2, True), (2, 3, False), (3, 4, True)):
        assert same_partitions(checkpoints / f"step-{before:08d}", checkpoints / f"step-{after:08d}") == [same, same]
    assert all(torch.isfinite(w).all() for w in get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoints), tag="step-00000004").values())


@pytest.mark.slow
def test_sigkill_between_checkpoints_and_during_a_checkpoint_write_then_resume(tiny_model, beir_dir, tmp_path):
    """As the pre-training test of the same name (test_pretrain_train.py): a 2-rank run of 4 steps with a checkpoint
    every 2, killed with SIGKILL between checkpoints 2 and 4, then during the write of checkpoint 4, resumed each
    time (an explicit --resume_from_checkpoint, then auto), logs the per-step numbers of an uninterrupted run and
    exports the same model."""
    teacher = tmp_path / "teacher.txt"  # every (query, document) pair: the sampled random negatives too
    teacher.write_text("".join(f"q{q} d{d} {random.Random(q * 30 + d).gauss(0, 1):.4f}\n"
                               for q in range(12) for d in range(30)))
    options = ("--max_steps", "4", "--save_steps", "2", "--representation", "dupmae", "--top_k", "16",
               "--teacher_scores", str(teacher), "--contrastive_loss_weight", "0.5")  # distillation on 2 ranks
    reference = tmp_path / "reference"
    done = launch_two_ranks(tiny_model, beir_dir, reference, *options)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    out = tmp_path / "out"
    kill_between_checkpoints(*two_ranks(tiny_model, beir_dir, out, *options), out)
    kill_during_checkpoint_write(*two_ranks(tiny_model, beir_dir, out, *options, "--resume_from_checkpoint",
                                            str(out / "checkpoints" / "step-00000002")), out)
    done = launch_two_ranks(tiny_model, beir_dir, out, *options, "--resume_from_checkpoint", "auto")
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "resumed from" in log and "step-00000002" in log, log[-4000:]
    ours, theirs = ([json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                    for folder in (out, reference))
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and (a["lr"], a["epoch"]) == (b["lr"], b["epoch"])
        assert a["distill"] > 0 and a["loss"] == pytest.approx(a["distill"] + 0.5 * a["contrastive"], rel=1e-5)
    before = Encoder.from_pretrained(str(reference / "model")).state_dict()
    after = Encoder.from_pretrained(str(out / "model")).state_dict()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_arrow_groups_from_preprocessing(tokenizer, tmp_path):
    """preprocessing.finetune_data's files: token ids are padded with [CLS]/[SEP] and cut; a vocab mismatch fails."""
    import pyarrow as pa

    from common.shard_format import (FINETUNE_CORPUS_FILE, FINETUNE_CORPUS_SCHEMA, FINETUNE_GROUPS_FILE,
                                     FINETUNE_GROUPS_SCHEMA, FINETUNE_QUERIES_FILE, FINETUNE_QUERIES_SCHEMA, Manifest)
    from common.tokenizer import TokenizerError, vocab_hash
    from finetune.data import load_finetune_data

    tables = {
        FINETUNE_CORPUS_FILE: pa.table({"doc_id": ["d0", "d1", "d2"], "input_ids": [[5, 6, 7, 8], [9], [10, 11]]},
                                       schema=FINETUNE_CORPUS_SCHEMA),
        FINETUNE_QUERIES_FILE: pa.table({"query_id": ["q0"], "input_ids": [[12, 13]]}, schema=FINETUNE_QUERIES_SCHEMA),
        FINETUNE_GROUPS_FILE: pa.table({"query_id": ["q0"], "positive_ids": [["d0"]], "negative_ids": [["d2", "d0"]]},
                                       schema=FINETUNE_GROUPS_SCHEMA),
    }
    for name, table in tables.items():
        with pa.ipc.new_file(str(tmp_path / name), table.schema) as writer:
            writer.write_table(table)
    manifest = Manifest("finetune", "t", vocab_hash(tokenizer), 144, [], {}, {})
    manifest.write(tmp_path)
    data = load_finetune_data(str(tmp_path), "train", None, tokenizer, DeadLetter(None))
    assert [(g.query_id, g.positives, g.negatives) for g in data.groups] == [("q0", ["d0"], ["d2"])]
    batch = Collator(tokenizer, 4, 5).encode([data.queries["q0"], data.corpus["d0"], data.corpus["d1"]], 5)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[cls, 12, 13, sep, pad], [cls, 5, 6, 7, sep], [cls, 9, sep, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="--negatives applies to BEIR folders"):
        load_finetune_data(str(tmp_path), "train", "negs.jsonl", tokenizer, DeadLetter(None))
    Manifest("finetune", "other", "0" * 64, 144, [], {}, {}).write(tmp_path)
    with pytest.raises(TokenizerError, match="vocabulary differs"):
        load_finetune_data(str(tmp_path), "train", None, tokenizer, DeadLetter(None))


TOPICS = [  # (document, query, a near miss: same subject, does not answer)
    ("Insulin is secreted by beta cells in the pancreas to lower blood glucose.", "which cells secrete insulin",
     "Insulin resistance develops when muscle cells respond poorly to insulin."),
    ("Mosquitoes transmit the malaria parasite between human hosts.", "how is malaria spread",
     "Malaria causes recurring fever and anemia in children."),
    ("Statins lower LDL cholesterol by inhibiting HMG-CoA reductase in the liver.", "how statins lower cholesterol",
     "Statins can cause muscle pain in some patients."),
    ("The hippocampus is essential for forming new long-term memories.", "brain region for memory formation",
     "The cerebellum coordinates balance and fine movements."),
    ("Smoking tobacco is the leading cause of lung cancer worldwide.", "main cause of lung cancer",
     "Lung cancer is often diagnosed late because early symptoms are mild."),
    ("Vaccines train the immune system to recognize a pathogen before infection.", "how vaccines work",
     "Vaccines are stored at low temperatures during transport."),
    ("Low birth weight raises the risk of infant death in the first month.", "birth weight and infant mortality",
     "Birth weight is recorded in grams at delivery."),
    ("Antibiotics kill bacteria but have no effect on viruses such as influenza.", "do antibiotics treat the flu",
     "Influenza vaccines are updated every year."),
    ("Regular aerobic exercise lowers resting heart rate and blood pressure.", "exercise effect on blood pressure",
     "Blood pressure is measured with a cuff on the upper arm."),
    ("Vitamin D is produced in the skin when it is exposed to sunlight.", "how the body makes vitamin D",
     "Vitamin C is found in citrus fruits."),
    ("Red blood cells carry oxygen bound to hemoglobin.", "what carries oxygen in blood",
     "White blood cells fight infections."),
    ("Type 1 diabetes is an autoimmune destruction of insulin-producing cells.", "cause of type 1 diabetes",
     "Type 2 diabetes is managed with diet and metformin."),
    ("CRISPR-Cas9 cuts DNA at a location chosen by a guide RNA.", "how CRISPR edits genes",
     "Gene sequencing costs have fallen sharply."),
    ("Alzheimer's disease is marked by amyloid plaques and tau tangles.", "brain changes in Alzheimer's",
     "Alzheimer's disease affects millions of older adults."),
    ("Sleep deprivation impairs attention and working memory.", "effects of lack of sleep on the mind",
     "Adults are advised to sleep seven to nine hours."),
    ("Folic acid taken in pregnancy prevents neural tube defects.", "why take folic acid when pregnant",
     "Pregnancy lasts about forty weeks."),
]

@pytest.mark.slow
@pytest.mark.parametrize("flags,learning", [([], True), (["--normalize", "false", "--temperature", "0.02"], False)])
def test_readme_dupmae_command_keeps_most_queries_learning(minilm_path, tokenizer, tmp_path, flags, learning):
    """The README's `--representation dupmae` fine-tuning of a pre-training export, on easy pairs the packaged model
    already ranks right: with the default temperature (0.05: the export scores cos + w cos) most queries still get a
    gradient; the old defaults, 0.02 on raw dot products, turned the softmax into a hard max (the bug of issue 13)."""
    from pretrain.modeling import DupMAEConfig, DupMAEModel

    export = tmp_path / "export"
    DupMAEModel.from_pretrained(minilm_path, DupMAEConfig()).save_export(str(export), tokenizer)
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    docs = {f"d{i}": doc for i, (doc, _, _) in enumerate(TOPICS)}
    docs.update({f"n{i}": near_miss for i, (_, _, near_miss) in enumerate(TOPICS)})  # no passage twice in a batch
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                               for d, t in docs.items()))
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": query}) + "\n"
                                                for i, (_, query, _) in enumerate(TOPICS)))
    (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"q{i}\td{i}\t1\n" for i in range(len(TOPICS))))
    negatives = tmp_path / "negs.jsonl"
    negatives.write_text("".join(json.dumps({"query_id": f"q{i}", "negatives": [f"n{i}"]}) + "\n"
                                 for i in range(len(TOPICS))))
    out = tmp_path / "run"
    subprocess.run([sys.executable, "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json",
                    "--model_name_or_path", str(export), "--representation", "dupmae", "--data_dir", str(data),
                    "--negatives", str(negatives), "--train_group_size", "2", "--per_device_train_batch_size", "16", "--max_steps", "1",
                    "--learning_rate", "1e-6", "--logging_steps", "1", "--output_dir", str(out), *flags],
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["accuracy"] >= 0.75  # the positives already rank first
    assert (record["learning_queries"] > 0.5) == learning, record
