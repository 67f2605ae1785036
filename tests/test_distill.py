"""Distillation (issue 31): the KL against a plain reference on fixed scores, the gradient of the teacher term alone,
score files (malformed lines named file:line, missing pairs named by query and document), a tiny random
CrossEncoder as the teacher end to end, and the standard BM25 (against Anserini's SciFact figure when the data is
there). The 2-rank checks live beside the other 2-rank runs in test_finetune.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from finetune.data import DeadLetter, TrainGroup, load_beir
from finetune.loss import positive_labels
from finetune.model import BiEncoder
from finetune.teacher import (TeacherScoreError, check_coverage, distill_kl, group_scores, own_group,
                              read_teacher_scores, write_teacher_scores)
from test_finetune import REPO, _env, _tiny_batch, beir_dir, config, tiny_model, tokenizer  # noqa: F401  fixtures


def _softmax(row: list[float], tau: float) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / tau) for x in row]
    return [e / sum(exps) for e in exps]


def test_kl_equals_reference_on_fixed_scores():
    student = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.3, 0.8]])
    teacher = torch.tensor([[12.0, 3.0, 7.5], [-1.0, 2.0, 0.5]])
    tau, tau_t = 0.05, 2.0
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p, q = _softmax(t, tau_t), _softmax(s, tau)
        expected += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))
    assert distill_kl(student, teacher, tau, tau_t).item() == pytest.approx(expected / 2, rel=1e-5)
    assert distill_kl(student, teacher, tau, tau_t, "mean").item() == pytest.approx(expected / 6, rel=1e-5)  # official
    official = torch.nn.KLDivLoss(reduction="mean")(torch.log_softmax(student / tau, -1),
                                                    torch.softmax(teacher / tau_t, -1))  # BiEncoderModel's kl_loss
    assert distill_kl(student, teacher, tau, tau_t, "mean").item() == pytest.approx(official.item(), rel=1e-6)
    assert distill_kl(student, student * tau_t / tau, tau, tau_t).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(student.bfloat16(), teacher, tau, tau_t).dtype == torch.float32  # fp32 under bf16


def test_own_group_picks_each_querys_passages_with_an_offset():
    scores = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)  # 2 queries x (2 ranks x 2 queries x 3)
    labels = positive_labels(2, 3, offset=6)
    assert own_group(scores, labels, 3).tolist() == [[6, 7, 8], [21, 22, 23]]


def test_teacher_term_alone_gives_the_analytic_gradient(tiny_model, tokenizer):
    """contrastive_loss_weight 0: the loss is the KL only; ∂L/∂scores is (q − p) / (τ · Bq) on each query's own
    group and zero on every in-batch passage; the model's weights get a gradient from it."""
    scores = torch.randn(3, 9, requires_grad=True)
    teacher = torch.randn(3, 3)
    labels = positive_labels(3, 3)
    tau, tau_t = 0.5, 1.5
    distill_kl(own_group(scores, labels, 3), teacher, tau, tau_t).backward()
    q = torch.softmax(own_group(scores, labels, 3).detach() / tau, -1)
    p = torch.softmax(teacher / tau_t, -1)
    expected = torch.zeros(3, 9)
    expected.scatter_(1, labels[:, None] + torch.arange(3), (q - p) / (tau * 3))
    torch.testing.assert_close(scores.grad, expected, rtol=1e-5, atol=1e-7)

    for kind in ("mean", "dupmae"):
        model = BiEncoder.from_config(config(model_name_or_path=str(tiny_model), representation=kind, top_k=8,
                                             train_group_size=2, temperature=1.0, contrastive_loss_weight=0.0)).eval()
        query, passage = _tiny_batch(tokenizer, 3, 2, seed=3)
        output = model(query, passage, torch.tensor([[2.0, -1.0], [0.5, 0.0], [-3.0, 1.0]]))
        assert output.loss.item() == pytest.approx(output.distill.item()) and output.distill.item() > 0
        assert output.contrastive.item() > 0  # computed and logged, but weighted 0
        output.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum().item() for g in grads) > 0, kind
        plain = model(query, passage)  # no teacher: InfoNCE alone, the distill term logged as 0
        assert plain.loss.item() == pytest.approx(plain.contrastive.item()) and plain.distill.item() == 0


def test_score_files_round_trip_and_name_the_bad_line(tmp_path):
    good = tmp_path / "a.txt"
    write_teacher_scores(good, {"q1": {"d1": 1.5, "d2": -0.25}, "q2": {"d1": 3.0}})
    later = tmp_path / "b.txt"
    later.write_text("q2 d1 [4.0]\n\nq2 d3 2\n")  # brackets as the official reader allows; later files win
    assert read_teacher_scores(f"{good},{later}") == {"q1": {"d1": 1.5, "d2": -0.25}, "q2": {"d1": 4.0, "d3": 2.0}}
    for text, reason in (("q1 d1 1.0\nq1 d2\n", "expected 'qid did score'"), ("q1 d1 high\n", "is not a number"),
                         ("q1 d1 1\nq2 d2 nan\n", "is not finite")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        line = len(text.splitlines())
        with pytest.raises(TeacherScoreError, match=f"{bad}:{line}: .*{reason}"):
            read_teacher_scores(bad)
    with pytest.raises(ValueError, match="whitespace"):
        write_teacher_scores(tmp_path / "c.txt", {"q 1": {"d1": 1.0}})


def test_a_pair_without_a_teacher_score_is_an_error_naming_query_and_document():
    table = {"q1": {"d1": 1.0, "d2": 0.5}}
    assert group_scores(table, [("q1", ["d2", "d1"])]).tolist() == [[0.5, 1.0]]
    with pytest.raises(TeacherScoreError, match="query 'q1' and document 'd9'"):
        group_scores(table, [("q1", ["d1", "d9"])])
    with pytest.raises(TeacherScoreError, match="query 'q2' and document 'd1'"):
        check_coverage(table, [TrainGroup("q1", ["d1"], ["d2"]), TrainGroup("q2", ["d1"], [])], ["d1", "d2"])


@pytest.mark.slow
def test_a_tiny_cross_encoder_teaches_end_to_end(tokenizer, beir_dir, tiny_model, tmp_path):
    """A random CrossEncoder made here: its scores file equals CrossEncoder.predict's logits on every pair, and a
    fine-tuning run distils from it (the KL is logged, the loss is KL + 0.5 x InfoNCE)."""
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    from finetune.teacher_scores import TeacherScoresConfig, teacher_scores

    torch.manual_seed(0)
    teacher_dir = tmp_path / "ce"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=len(tokenizer),
                                             max_position_embeddings=64, num_labels=1)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    negatives = tmp_path / "negs.jsonl"
    negatives.write_text("".join(json.dumps({"query_id": f"q{i}", "negatives": [f"d{(2 * i + j) % 30}" for j in
                                                                                 range(1, 6)]}) + "\n"
                                 for i in range(12)))
    scores = teacher_scores(TeacherScoresConfig(scorer="cross-encoder", model=str(teacher_dir), data_dir=str(beir_dir),
                                                negatives=str(negatives), out=str(tmp_path / "scores.txt"),
                                                passage_max_length=48, bf16="false"))
    table = read_teacher_scores(scores)
    data = load_beir(beir_dir, "train", str(negatives), DeadLetter(None))
    pairs = [(g.query_id, d) for g in data.groups for d in g.positives + g.negatives]
    assert sorted((q, d) for q, row in table.items() for d in row) == sorted(pairs)
    expected = CrossEncoder(str(teacher_dir), max_length=48).predict(
        [(data.queries[q], data.corpus[d]) for q, d in pairs], activation_fn=torch.nn.Identity())
    assert [table[q][d] for q, d in pairs] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)

    done = subprocess.run([sys.executable, "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json",
                           "--model_name_or_path", str(tiny_model), "--data_dir", str(beir_dir), "--negatives",
                           str(negatives), "--output_dir", str(tmp_path / "run"), "--train_group_size", "3",
                           "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
                           "--passage_max_length", "24", "--learning_rate", "1e-3", "--teacher_scores", str(scores),
                           "--teacher_temperature", "0.01", "--contrastive_loss_weight", "0.5", "--bf16", "false"],
                          env=_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # HF Trainer's schedule and logging: warm-up ceil(0.1 x 2) = 1 step at lr 0, then 1e-3 decaying to 0; each line
    # logs the lr after its step's schedule update (DeepSpeed's WarmupDecayLR, a step behind, gave 0 and 5e-4)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 0.0])
    for m in metrics:
        assert m["distill"] > 0 and m["loss"] == pytest.approx(m["distill"] + 0.5 * m["contrastive"], rel=1e-5)
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_bm25_teacher_scores_are_the_index_scores(beir_dir, tmp_path):
    pytest.importorskip("Stemmer")
    from common.bm25 import BM25
    from finetune.teacher_scores import TeacherScoresConfig, teacher_scores

    negatives = tmp_path / "negs.jsonl"
    negatives.write_text("".join(json.dumps({"query_id": f"q{i}", "negatives": ["d1", "d3", "d29"]}) + "\n"
                                 for i in range(12)))
    path = teacher_scores(TeacherScoresConfig(scorer="bm25", data_dir=str(beir_dir), negatives=str(negatives),
                                              out=str(tmp_path / "bm25.txt")))
    table = read_teacher_scores(path)
    data = load_beir(beir_dir, "train", str(negatives), DeadLetter(None))
    doc_ids = list(data.corpus)
    index = BM25([data.corpus[d] for d in doc_ids])
    for group in data.groups:
        row = index.scores(data.queries[group.query_id])
        assert table[group.query_id] == pytest.approx({d: float(row[doc_ids.index(d)]) for d in
                                                       group.positives + group.negatives}, rel=1e-6)


def test_standard_bm25_stems_and_keeps_the_old_preset():
    pytest.importorskip("Stemmer")
    from common.bm25 import BM25, BM25S_DEFAULTS

    corpus = ["the cells divide", "a cell divided quickly", "proteins fold"]
    assert BM25(corpus).search(["cells"], 3)[0][:2] in ([0, 1], [1, 0])
    assert (BM25(corpus).scores("cells") > 0).tolist() == [True, True, False]  # Porter: cells ~ cell
    assert (BM25(corpus, BM25S_DEFAULTS).scores("cells") > 0).tolist() == [True, False, False]


@pytest.mark.shared
def test_standard_bm25_matches_anserini_on_scifact(scifact_dir):
    """BEIR's published BM25 (Anserini, flat index) scores SciFact test nDCG@10 0.6789."""
    pytest.importorskip("Stemmer")
    from evaluation.data import load_beir as load_test
    from evaluation.fusion import bm25_run
    from evaluation.metrics import evaluate

    data = load_test(scifact_dir, "test")
    assert evaluate(data.qrels, bm25_run(data, 100))["nDCG@10"] == pytest.approx(0.6789, abs=0.005)
    assert evaluate(data.qrels, bm25_run(data, 100, "bm25s-defaults"))["nDCG@10"] == pytest.approx(0.6617, abs=1e-4)


# ---------------------------------------------------------------- issue 35 item 6: four faults of the stage

def test_a_query_without_mined_negatives_is_refused_before_training():
    """Its group would be filled with random corpus documents, which have no teacher score: the run used to pass
    the check and fail at the first batch holding one, possibly hours in."""
    table = {"q1": {"d1": 1.0, "d2": 0.5}, "q2": {"d1": 0.3, "d2": 0.1}}
    corpus = ["d1", "d2", "d3"]
    check_coverage(table, [TrainGroup("q1", ["d1"], ["d2"])], corpus)
    with pytest.raises(TeacherScoreError, match="query 'q2' has no mined negatives.*document 'd3'"):
        check_coverage(table, [TrainGroup("q1", ["d1"], ["d2"]), TrainGroup("q2", ["d1"], [])], corpus)
    table["q2"]["d3"] = 0.2  # every document it can draw is scored
    check_coverage(table, [TrainGroup("q2", ["d1"], [])], corpus)


def test_bm25_scores_of_a_query_without_terms_are_zeros():
    """An empty query, or one made only of stop words, matches nothing: zeros, as `search` copes (bm25s read
    tokens[0] and raised IndexError)."""
    pytest.importorskip("Stemmer")
    from common.bm25 import BM25, BM25S_DEFAULTS

    corpus = ["the cells divide", "a cell divided quickly", "proteins fold"]
    for config in (BM25(corpus), BM25(corpus, BM25S_DEFAULTS)):
        for query in ("is this it", "", "  "):
            scores = config.scores(query)
            assert scores.dtype == np.float32 and scores.tolist() == [0.0, 0.0, 0.0], query


def _sequence_classifier(folder, tokenizer, num_labels: int, **config):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=len(tokenizer),
                                             max_position_embeddings=64, num_labels=num_labels,
                                             **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_two_label_cross_encoder_needs_its_relevant_label(tokenizer, beir_dir, tmp_path):
    """A 2-label reranker's column 0 is 'not relevant': taken silently, it reversed the teacher. Without --label
    such a model is refused; with it, that column's logit is the score (by index or by id2label name)."""
    from sentence_transformers import CrossEncoder

    from finetune.teacher_scores import TeacherScoresConfig, teacher_scores

    model = _sequence_classifier(tmp_path / "ce2", tokenizer, 2, id2label={0: "irrelevant", 1: "relevant"},
                                 label2id={"irrelevant": 0, "relevant": 1})
    negatives = tmp_path / "negs.jsonl"
    negatives.write_text(json.dumps({"query_id": "q0", "negatives": ["d3", "d5"]}) + "\n")

    def run(name: str, **options):
        return teacher_scores(TeacherScoresConfig(scorer="cross-encoder", model=str(model), data_dir=str(beir_dir),
                                                  negatives=str(negatives), out=str(tmp_path / name),
                                                  passage_max_length=48, bf16="false", **options))

    with pytest.raises(ValueError, match="2 labels.*--label"):
        run("refused.txt")
    data = load_beir(beir_dir, "train", str(negatives), DeadLetter(None))
    group = next(g for g in data.groups if g.query_id == "q0")
    docs = group.positives + group.negatives
    logits = CrossEncoder(str(model), max_length=48).predict([(data.queries["q0"], data.corpus[d]) for d in docs],
                                                             activation_fn=torch.nn.Identity())
    for label in ("1", "relevant"):
        table = read_teacher_scores(run(f"scores-{label}.txt", label=label))
        assert [table["q0"][d] for d in docs] == pytest.approx(logits[:, 1].tolist(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="label 'maybe'.*irrelevant.*relevant"):
        run("unknown.txt", label="maybe")


def test_two_writers_of_one_score_file_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    """Two shards finishing at once both merge into --out: the second writer starts while the first one is about
    to rename its temporary file. With one temporary name the second truncated it, renamed it, and the first
    rename failed (FileNotFoundError); each writer now has its own."""
    from pathlib import Path

    out = tmp_path / "scores.txt"
    table = {"q1": {"d1": 1.5, "d2": -0.25}, "q2": {"d1": 3.0}}
    real_replace, nested = Path.replace, []

    def replace_after_another_writer(self, target):
        if not nested:
            nested.append(self)
            write_teacher_scores(out, table)  # the other shard, start to end, between our write and rename
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace_after_another_writer)
    write_teacher_scores(out, table)
    assert read_teacher_scores(out) == table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.txt"]  # no temporary file left behind
