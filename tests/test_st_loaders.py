"""A dupmae export in sentence-transformers: SentenceTransformer (dense half) and SparseEncoder (sparse half) give
`Encoder`'s vectors, a search through them ranks as `evaluation.beir` does, and the pre-training and fine-tuning
exports load in both."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.representation import Encoder, RepresentationConfig, folder_config, new_projection, sparsify
from common.st_modules import SPARSE_DIR

TEXTS = ["a tiny query", "", "the second document is a little longer than the first one", "x", "gene and protein"]
WORDS = "protein cell gene cancer brain heart virus drug blood liver bone skin lung kidney muscle".split()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(minilm_path)


def tiny_mlm(tokenizer, seed: int = 0):
    """A tiny random BERT with an MLM head whose output bias is not zero (so sparse_bias matters)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    mlm = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=64))
    with torch.no_grad():
        mlm.get_output_embeddings().bias.normal_(0, 0.5)
    return mlm.eval()


def export(tokenizer, out, **fields):
    """A dupmae Encoder with a "trained" projection, saved to out; returns it."""
    config = RepresentationConfig(kind="dupmae", **fields)
    mlm = tiny_mlm(tokenizer)
    encoder = Encoder(mlm, config, torch.nn.Linear(32, config.dense_dim)).eval()
    encoder.save_pretrained(out, tokenizer)
    return encoder


def load_both(folder):
    from sentence_transformers import SentenceTransformer, SparseEncoder

    return (SentenceTransformer(str(folder), device="cpu"),
            SparseEncoder(str(folder / SPARSE_DIR), device="cpu", trust_remote_code=True))


def assert_loaders_equal(folder, tokenizer, reference: Encoder):
    """SentenceTransformer and SparseEncoder of `folder` against `reference` on TEXTS, within 1e-5."""
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference.eval()(**batch)
    indices, values = sparsify(expected.vocab, reference.config.top_k)
    expected_docs = torch.zeros_like(expected.vocab).scatter(-1, indices, values)  # documents keep their top_k
    dense, sparse = load_both(folder)
    close = dict(atol=1e-5, rtol=0)
    for encode in (dense.encode, dense.encode_query, dense.encode_document):
        torch.testing.assert_close(encode(TEXTS, convert_to_tensor=True, batch_size=2), expected.dense, **close)
    torch.testing.assert_close(sparse.encode_query(TEXTS, batch_size=2).to_dense(), expected.vocab, **close)
    for encode in (sparse.encode_document, sparse.encode):
        torch.testing.assert_close(encode(TEXTS, batch_size=2).to_dense(), expected_docs, **close)
    return dense, sparse


@pytest.mark.parametrize("fields", [dict(pooling="cls", normalize=False, dense_dim=16, top_k=5, sparse_bias=True),
                                    dict(pooling="mean", normalize=True, dense_dim=32, top_k=7, sparse_bias=False),
                                    dict(pooling="mean", normalize=True, dense_dim=32, top_k=7, sparse_bias=False,
                                         sparse_values="probs", sparse_weight=0.2)])
def test_loaders_give_encoder_vectors(tokenizer, tmp_path, fields):
    saved = export(tokenizer, tmp_path, **fields)
    loaded = Encoder.from_pretrained(str(tmp_path))
    assert loaded.config == saved.config == folder_config(str(tmp_path))  # representation.json wins over modules.json
    _, sparse = assert_loaders_equal(tmp_path, tokenizer, loaded)
    doc = sparse.encode_document(TEXTS[2])
    ids = sparsify(loaded(**tokenizer(TEXTS[2:3], return_tensors="pt")).vocab, 3)[0][0]
    assert [token for token, _ in sparse.decode(doc, top_k=3)] == tokenizer.convert_ids_to_tokens(ids.tolist())
    assert (tmp_path / SPARSE_DIR / "model.safetensors").resolve() == (tmp_path / "model.safetensors").resolve()


def test_sparse_folder_copies_where_links_fail(tokenizer, tmp_path, monkeypatch):
    from pathlib import Path

    def no_links(self, target):
        raise OSError("links not supported")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    export(tokenizer, tmp_path, dense_dim=16, top_k=5)
    copied = tmp_path / SPARSE_DIR / "model.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == (tmp_path / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------- search
@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory):
    """40 documents and 8 queries of medical words."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("beir") / "tiny"
    (out / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": WORDS[i % 15], "text": " ".join(rng.choice(WORDS, 4 + i % 20))}
            for i in range(40)]
    queries = [{"_id": f"q{j}", "text": " ".join(rng.choice(WORDS, 3))} for j in range(8)]
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                            "".join(f"q{j}\td{5 * j}\t1\n" for j in range(8)))
    return out


def test_search_through_loaders_ranks_as_evaluation(tokenizer, tiny_beir, tmp_path):
    """The README's combination: dense dot + sparse_weight x (full query vector · document top-k)."""
    from evaluation.beir import main
    from evaluation.data import load_beir

    model = tmp_path / "model"
    export(tokenizer, model, dense_dim=16, top_k=8, sparse_weight=0.5)
    main(["--model", str(model), "--datasets", str(tiny_beir), "--output_dir", str(tmp_path / "eval"),
          "--no_cache", "true", "--offline", "true", "--bf16", "false"])  # fp32, as sentence-transformers here
    expected = {}
    for line in (tmp_path / "eval" / "tiny.run").read_text().splitlines():
        qid, _, doc_id, rank, value, _ = line.split()
        if int(rank) <= 10:
            expected.setdefault(qid, []).append((doc_id, float(value)))

    data = load_beir(tiny_beir, "test")
    dense, sparse = load_both(model)
    sparse_weight = folder_config(str(model)).sparse_weight
    dense_scores = dense.similarity(dense.encode_query(data.query_texts), dense.encode_document(data.doc_texts))
    sparse_scores = sparse.similarity(sparse.encode_query(data.query_texts), sparse.encode_document(data.doc_texts))
    got = top10(dense_scores + sparse_weight * sparse_scores, data)
    assert {q: [d for d, _ in hits] for q, hits in got.items()} == {q: [d for d, _ in hits]
                                                                    for q, hits in expected.items()}
    for qid, hits in expected.items():
        np.testing.assert_allclose([s for _, s in got[qid]], [s for _, s in hits], atol=1e-5)
    dense_only = top10(dense_scores, data)  # the sparse half changes the ranking: the comparison above tests it
    assert any([d for d, _ in dense_only[q]] != [d for d, _ in expected[q]] for q in expected)


def top10(scores, data) -> dict[str, list[tuple[str, float]]]:
    top = torch.topk(torch.as_tensor(scores), 10, dim=1)
    return {qid: [(data.doc_ids[r], s) for r, s in zip(rows.tolist(), values.tolist())]
            for qid, rows, values in zip(data.query_ids, top.indices, top.values)}


# ------------------------------------------------------------------------------------------- exports
def test_pretrain_and_finetune_exports_load_in_both(tokenizer, tmp_path):
    from finetune.config import FinetuneConfig
    from finetune.model import BiEncoder
    from pretrain.modeling import DupMAEConfig, DupMAEModel

    pretrained = DupMAEModel(tiny_mlm(tokenizer, seed=3), DupMAEConfig())
    pretrained.save_export(str(tmp_path / "pretrain"), tokenizer)
    in_memory = Encoder(pretrained.mlm, pretrained.representation,  # the projection the export starts from
                        new_projection(32, pretrained.representation.dense_dim))
    assert_loaders_equal(tmp_path / "pretrain", tokenizer, in_memory)

    cfg = replace(FinetuneConfig(data_dir="x", output_dir="x", deepspeed="x"),
                  model_name_or_path=str(tmp_path / "pretrain"), representation="dupmae", top_k=6)
    finetuned = BiEncoder.from_config(cfg)
    with torch.no_grad():  # as if trained: the exported projection and head are not the initial ones
        finetuned.query_encoder.projection.weight.mul_(1.5)
        finetuned.query_encoder.model.get_output_embeddings().bias.add_(0.3)
    (folder,) = finetuned.export(tmp_path / "finetune", tokenizer)
    assert_loaders_equal(folder, tokenizer, finetuned.query_encoder)
