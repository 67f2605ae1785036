"""benchmarks/adaptation.py end to end on a tiny model and a tiny BEIR folder: every variant, both stages, the
report's lines and table (the real experiment's numbers are in the README; no timing here)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "mlm", "retromae", "dupmae", "dupmae-official")
WORDS = ("protein cell gene virus cancer brain heart drug dose mouse risk blood insulin liver kidney lung "
         "vaccine fever sleep memory").split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny")
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=len(tokenizer), max_position_embeddings=160)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def beir(folder: Path, n_docs: int = 60) -> Path:
    """Documents of random topic words; a query is three words of its document; train and test queries."""
    rng = random.Random(0)
    (folder / "qrels").mkdir(parents=True)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(8, 30))) for _ in range(n_docs)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(docs)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": " ".join(t.split()[:3])}) + "\n"
                                                  for i, t in enumerate(docs)))
    for split, ids in (("train", range(0, n_docs, 2)), ("test", range(1, n_docs, 2))):
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                       "".join(f"q{i}\td{i}\t1\n" for i in ids))
    return folder


@pytest.mark.slow
def test_every_variant_end_to_end(tiny_model, tmp_path):
    data = beir(tmp_path / "tinybeir")
    out = tmp_path / "out"
    command = [sys.executable, "benchmarks/adaptation.py", "--smoke", "--variants", ",".join(VARIANTS),
               "--output_dir", str(out), "--datasets", str(data),
               "--model_name_or_path", str(tiny_model), "--max_steps", "2", "--freeze_encoder_steps", "1",
               "--per_device_train_batch_size", "4", "--max_seq_length", "64", "--finetune_steps", "2",
               "--finetune_batch_size", "4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_key = {(x["variant"], x["stage"], x["representation"], x["metric"]): x for x in lines}
    variants = VARIANTS
    for variant in variants:
        dupmae = variant.startswith("dupmae")
        for metric in ("nDCG@10", "Recall@100"):
            for stage in ("zero-shot", "fine-tuned"):
                for representation in ("mean", "cls") + (("dupmae",) if dupmae else ()):
                    assert (variant, stage, representation, metric) in by_key
    assert ("bm25", "zero-shot", "bm25", "nDCG@10") in by_key
    assert ("none+bm25", "zero-shot", "rrf", "nDCG@10") in by_key  # the base model fused with BM25
    for line in lines:
        if line["variant"] in ("bm25", "none+bm25"):
            assert line["baseline"] is None
            continue
        none_best = max(v["ours"] for k, v in by_key.items()
                        if k[0] == "none" and k[1] == line["stage"] and k[3] == line["metric"])
        assert line["baseline"] == none_best and line["ratio"] == pytest.approx(line["ours"] / none_best, abs=1e-3)
        assert line["per_seed"] == [line["ours"]] and line["spread"] == 0 and line["dataset"] == "tinybeir"
    # the variants' flags reached the model: mlm has no decoder, only the DupMAE variants trained a BoW head
    runs = out / "tinybeir" / "seed-42"
    assert not (runs / "mlm" / "pretrain" / "export" / "dupmae_decoder.safetensors").exists()
    assert (runs / "retromae" / "pretrain" / "export" / "dupmae_decoder.safetensors").exists()
    for variant, bow in (("mlm", 0.0), ("retromae", 0.0), ("dupmae", 1.0), ("dupmae-official", 0.1)):
        config = json.loads((runs / variant / "pretrain" / "export" / "dupmae_config.json").read_text())
        assert config["bow_weight"] == bow
        assert config["objective"] == ("official" if variant == "dupmae-official" else "paper")
    table = (out / "results.md").read_text()
    assert "### tinybeir" in table and "| dupmae | fine-tuned | dupmae |" in table
    # the same fine-tuning for every variant: mean, and a DupMAE export's tuned copy keeps its MLM head
    for variant in variants:
        tuned = runs / variant / "finetune" / "model"
        assert json.loads((tuned / "representation.json").read_text())["kind"] == "mean"
    from safetensors import safe_open

    with safe_open(str(runs / "dupmae" / "finetune" / "model" / "model.safetensors"), "pt") as weights:
        assert any(key.startswith("cls.predictions") for key in weights.keys())
    # the fine-tuned dupmae rows score a folder that holds both halves (sentence-transformers reads both)
    artifact = runs / "dupmae" / "finetune" / "dupmae"
    assert json.loads((runs / "dupmae" / "fine-tuned.json").read_text())["key"]["model"] == str(artifact)
    assert (artifact / "sparse" / "modules.json").is_file() and (artifact / "2_Dense" / "model.safetensors").is_file()
    # a second run with the same options reuses every stage
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and [json.loads(x) for x in again.stdout.splitlines()] == lines
    assert "running:" not in again.stderr


def test_fine_tuned_dupmae_row_is_reproduced_by_its_artifact(tiny_model, tmp_path, caplog):
    """A fine-tuned dupmae row (the tuned encoder's dense half + the pre-trained sparse half) names a folder that
    reproduces it: here, and in sentence-transformers (SentenceTransformer + SparseEncoder of the same folder).
    The fine-tuning's own export records `mean` and has no sparse/ or projection: it reproduces the control."""
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from common.representation import Encoder, RepresentationConfig, folder_config
    from common.tokenizer import load_tokenizer
    from evaluation.metrics import evaluate
    from experiments.adaptation import with_sparse_half
    from experiments.scoring import _test_split, evaluate_model

    tokenizer = load_tokenizer(str(tiny_model))
    export, tuned = tmp_path / "export", tmp_path / "tuned"
    dupmae = RepresentationConfig(kind="dupmae", pooling="mean", normalize=True, dense_dim=32, top_k=8,
                                  sparse_bias=False, sparse_values="probs", sparse_weight=0.5)
    Encoder.from_pretrained(str(tiny_model), dupmae).save_pretrained(export, tokenizer)  # as pre-training exports
    fine = Encoder.from_pretrained(str(export), RepresentationConfig(kind="mean", normalize=True))
    with torch.no_grad():  # "fine-tuning": the encoder moves, the MLM head stays
        fine.model.base_model.encoder.layer[0].output.dense.weight.mul_(1.5)
    fine.save_pretrained(tuned, tokenizer)
    data = beir(tmp_path / "data")
    row = evaluate_model(str(tuned), data, 64, 0, dupmae)["dupmae"]  # how the table scored the row
    assert folder_config(str(tuned)).kind == "mean" and not (tuned / "sparse").exists()

    with caplog.at_level("WARNING"):
        artifact = with_sparse_half(str(tuned), dupmae, str(export), tmp_path / "artifact")
    assert not caplog.records  # the export's projection is read, not initialized with a warning
    assert folder_config(artifact) == dupmae
    assert evaluate_model(artifact, data, 64, 0, folder_config(artifact))["dupmae"] == row

    split = _test_split(data, 0)
    dense = SentenceTransformer(artifact, device="cpu")
    dense.max_seq_length = 64
    sparse = SparseEncoder(str(Path(artifact) / "sparse"), device="cpu", trust_remote_code=True)
    sparse.max_seq_length = 64
    queries = [split.query_texts[i] for i in range(len(split.query_ids))]
    scores = (dense.similarity(dense.encode(queries, convert_to_tensor=True),
                               dense.encode(split.doc_texts, convert_to_tensor=True))
              + dupmae.sparse_weight * sparse.similarity(sparse.encode_query(queries),
                                                         sparse.encode_document(split.doc_texts)).to_dense())
    ranking = {qid: {split.doc_ids[j]: float(scores[i, j]) for j in range(len(split.doc_ids))
                     if split.doc_ids[j] != qid} for i, qid in enumerate(split.query_ids)}
    assert evaluate(split.qrels, ranking)["nDCG@10"] == pytest.approx(row["nDCG@10"], abs=1e-6)
    assert with_sparse_half(str(tuned), dupmae, str(export), tmp_path / "artifact") == artifact  # reused
