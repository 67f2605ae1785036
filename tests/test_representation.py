"""common.representation against plain reference computations, and save/load round trips."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from common import representation as rep
from common.representation import Encoder, Representation, RepresentationConfig, score, sparsify

TEXTS = ["a tiny query", "", "the second document is a little longer than the first one", "x"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory, tokenizer):
    """A tiny BERT with a (random, seeded) MLM head, saved like pre-training's export."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tokenizer))
    out = tmp_path_factory.mktemp("tiny_mlm")
    BertForMaskedLM(cfg).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def batch(tokenizer, texts=TEXTS):
    return tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        RepresentationConfig(kind="max")
    with pytest.raises(ValueError, match="dense_dim"):
        RepresentationConfig(kind="dupmae", dense_dim=0)
    with pytest.raises(ValueError, match="top_k"):
        RepresentationConfig(top_k=-1)


def test_sparsify_and_score_equal_reference_loop():
    g = torch.Generator().manual_seed(0)
    q = Representation(torch.randn(3, 8, generator=g), torch.randn(3, 50, generator=g))
    d = Representation(torch.randn(5, 8, generator=g), torch.randn(5, 50, generator=g))
    k = 7
    indices, values = sparsify(d.vocab, k)
    assert indices.shape == values.shape == (5, k)
    expected = torch.zeros(3, 5)
    for i in range(3):
        for j in range(5):
            kept = sorted(range(50), key=lambda t: -d.vocab[j, t].item())[:k]
            assert set(indices[j].tolist()) == set(kept)
            expected[i, j] = q.dense[i] @ d.dense[j] + sum(q.vocab[i, t] * d.vocab[j, t] for t in kept)
    torch.testing.assert_close(score(q, d, k), expected)
    torch.testing.assert_close(score(q, d, None), q.dense @ d.dense.T + q.vocab @ d.vocab.T)
    dense_only = score(Representation(q.dense), Representation(d.dense), k)
    torch.testing.assert_close(dense_only, q.dense @ d.dense.T)
    with pytest.raises(ValueError, match="both"):
        score(q, Representation(d.dense), k)


def test_score_gradient_reaches_only_kept_doc_entries():
    d_vocab = torch.randn(2, 20, requires_grad=True)
    q = Representation(torch.randn(1, 4), torch.randn(1, 20))
    score(q, Representation(torch.randn(2, 4), d_vocab), 3).sum().backward()
    kept = torch.zeros(2, 20, dtype=torch.bool).scatter(1, sparsify(d_vocab.detach(), 3)[0], True)
    assert torch.all(d_vocab.grad[~kept] == 0)
    torch.testing.assert_close(d_vocab.grad[kept], q.vocab.expand(2, 20)[kept])


def test_dupmae_forward_equals_reference(tiny_mlm_dir, tokenizer, monkeypatch):
    from transformers import BertForMaskedLM

    enc = Encoder.from_pretrained(str(tiny_mlm_dir), RepresentationConfig(kind="dupmae", dense_dim=16, top_k=5)).eval()
    ref = BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    b = batch(tokenizer)
    monkeypatch.setattr(rep, "VOCAB_CHUNK", 7)  # several vocabulary chunks: the running max must match one pass
    with torch.no_grad():
        out = enc(**b)
        ref_out = ref(**b, output_hidden_states=True)
    assert out.dense.shape == (4, 16) and out.vocab.shape == (4, len(tokenizer))
    torch.testing.assert_close(out.dense, enc.projection(ref_out.hidden_states[-1][:, 0]))
    for row, ids in enumerate(b["input_ids"]):
        positions = [p for p, t in enumerate(ids.tolist()) if t not in tokenizer.all_special_ids]
        if not positions:  # the empty text: no ordinary token, zero vector
            assert torch.all(out.vocab[row] == 0)
            continue
        torch.testing.assert_close(out.vocab[row], ref_out.logits[row, positions].amax(0))


def test_dupmae_save_load_round_trip(tiny_mlm_dir, tokenizer, tmp_path):
    cfg = RepresentationConfig(kind="dupmae", dense_dim=16, top_k=5, normalize=True)
    enc = Encoder.from_pretrained(str(tiny_mlm_dir), cfg).eval()
    with torch.no_grad():
        enc.projection.weight.add_(0.5)  # a "trained" projection must survive the round trip
        before = enc(**batch(tokenizer))
    enc.save_pretrained(tmp_path, tokenizer)
    loaded = Encoder.from_pretrained(str(tmp_path)).eval()  # the saved config wins over modules.json (dense half)
    assert loaded.config == cfg
    with torch.no_grad():
        after = loaded(**batch(tokenizer))
    torch.testing.assert_close(after.dense, before.dense)
    torch.testing.assert_close(after.vocab, before.vocab)


def test_missing_head_and_projection_warn_and_are_deterministic(minilm_path, tokenizer, caplog):
    cfg = RepresentationConfig(kind="dupmae", dense_dim=8)
    with caplog.at_level(logging.WARNING, logger="common.representation"):
        first = Encoder.from_pretrained(minilm_path, cfg).eval()
    assert "no trained MLM head" in caplog.text and "projection" in caplog.text
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    second = Encoder.from_pretrained(minilm_path, cfg).eval()
    assert torch.equal(torch.random.get_rng_state(), state)  # loading leaves the caller's RNG alone
    b = batch(tokenizer, TEXTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(first(**b).vocab, second(**b).vocab, rtol=0, atol=0)
        torch.testing.assert_close(first(**b).dense, second(**b).dense, rtol=0, atol=0)


def test_a_projection_file_asked_for_and_absent_is_an_error(minilm_path, tmp_path):
    """Named explicitly (a pre-training export's W for its fine-tuned copy), a missing file must not become the
    identity projection that a folder without one starts from."""
    cfg = RepresentationConfig(kind="dupmae", dense_dim=384)
    with pytest.raises(FileNotFoundError, match="gone.safetensors: no such projection file"):
        Encoder.from_pretrained(minilm_path, cfg, projection_file=tmp_path / "gone.safetensors")
    assert Encoder.from_pretrained(minilm_path, cfg).projection is not None  # the folder's own absence: identity


@pytest.mark.parametrize("source", ["save_file", "export"])
@pytest.mark.parametrize("dense_dim", [32, 16])  # square (the identity start) and not (a seeded Gaussian start)
def test_a_projection_file_is_loaded_exactly(tiny_mlm_dir, tokenizer, tmp_path, dense_dim, source):
    """`projection_file` names W's weights from elsewhere (a folder without its own): the encoder's projection is
    that file's tensors, bit for bit, not the initial W. Written by safetensors with the projection's own keys, or
    as a dupmae export's projection.safetensors."""
    from safetensors.torch import load_file, save_file

    cfg = RepresentationConfig(kind="dupmae", dense_dim=dense_dim, top_k=5)
    initial = rep.new_projection(32, dense_dim).state_dict()
    g = torch.Generator().manual_seed(dense_dim)
    trained = {name: torch.randn(tensor.shape, generator=g) for name, tensor in initial.items()}
    if source == "save_file":
        path = tmp_path / "w.safetensors"
        save_file(trained, str(path))
    else:
        export = Encoder.from_pretrained(str(tiny_mlm_dir), cfg)
        export.projection.load_state_dict(trained)
        export.save_pretrained(tmp_path / "export", tokenizer)
        path = tmp_path / "export" / rep.PROJECTION_NAME
    expected = load_file(str(path))
    assert expected.keys() == initial.keys() and not torch.equal(expected["weight"], initial["weight"])
    loaded = Encoder.from_pretrained(str(tiny_mlm_dir), cfg, projection_file=path).projection.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype == torch.float32 and torch.equal(loaded[name], tensor)
        assert torch.equal(loaded[name], trained[name])


def test_sentence_transformers_folder_config(minilm_path):
    enc = Encoder.from_pretrained(minilm_path)
    assert enc.config.kind == "mean" and enc.config.normalize and enc.max_seq_length == 256
    assert Encoder.from_pretrained(None).config == enc.config  # None -> the packaged model
    assert Encoder.from_pretrained(minilm_path, RepresentationConfig(kind="cls")).config.kind == "cls"


@pytest.mark.parametrize("kind,normalize", [("cls", False), ("mean", True)])
def test_dense_save_load_matches_sentence_transformers(tiny_mlm_dir, tokenizer, tmp_path, kind, normalize):
    from sentence_transformers import SentenceTransformer

    cfg = RepresentationConfig(kind=kind, normalize=normalize)
    enc = Encoder.from_pretrained(str(tiny_mlm_dir), cfg).eval()
    b = batch(tokenizer)
    with torch.no_grad():
        ours = enc(**b).dense
        hidden = enc.model(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).float()
    expected = hidden[:, 0] if kind == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    if normalize:
        expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ours, expected)

    enc.save_pretrained(tmp_path, tokenizer)
    assert json.loads((tmp_path / "representation.json").read_text())["kind"] == kind
    assert not (tmp_path / "sparse").exists()
    assert json.loads((tmp_path / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "dot"
    assert Encoder.from_pretrained(str(tmp_path)).config == cfg
    (tmp_path / "representation.json").unlink()  # sentence-transformers modules alone give the same config
    assert Encoder.from_pretrained(str(tmp_path)).config == cfg
    st = SentenceTransformer(str(tmp_path), device="cpu")
    st_emb = st.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    torch.testing.assert_close(st_emb, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("values,normalize", [("logits", False), ("probs", False), ("probs", True), ("logits", True)])
def test_sparse_half_equals_reference(values, normalize):
    from common.representation import sparse_half

    pooled = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])  # row 1 is [CLS] [SEP]: no ordinary token
    expected = torch.softmax(pooled, -1) if values == "probs" else pooled.clone()
    if normalize:
        expected = expected / expected.norm(dim=-1, keepdim=True)
    expected[1] = 0
    torch.testing.assert_close(sparse_half(pooled, mask, values, normalize), expected)


def test_dupmae_config_of_plain_encoders_and_sentence_embedders():
    from common.representation import ZERO_SHOT_SPARSE, dupmae_config

    assert dupmae_config(None, 768) == RepresentationConfig(kind="dupmae")  # the paper's
    st = dupmae_config(RepresentationConfig(kind="mean", normalize=True), 768)
    assert (st.pooling, st.normalize, st.dense_dim) == ("mean", True, 768)
    assert {k: getattr(st, k) for k in ZERO_SHOT_SPARSE} == ZERO_SHOT_SPARSE
    assert dupmae_config(st, 32) is st


def _st_scores(folder, queries, docs):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    return st.similarity(st.encode(queries, convert_to_tensor=True), st.encode(docs, convert_to_tensor=True))


def _our_scores(folder, tokenizer, queries, docs):
    enc = Encoder.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return score(enc(**batch(tokenizer, queries)), enc(**batch(tokenizer, docs)), None)


@pytest.mark.parametrize("similarity,normalize_module,expected", [
    ("cosine", False, True), (None, False, True), ("dot", False, False), ("dot", True, True), (None, True, True)])
def test_sentence_transformers_similarity_decides_normalization(tiny_mlm_dir, tokenizer, tmp_path, caplog,
                                                                 similarity, normalize_module, expected):
    """A sentence-transformers folder is scored as sentence-transformers scores it: its similarity_fn_name, and
    cosine (sentence-transformers' default) when config_sentence_transformers.json names none."""
    Encoder.from_pretrained(str(tiny_mlm_dir), RepresentationConfig(kind="mean", normalize=normalize_module)) \
        .save_pretrained(tmp_path, tokenizer)
    (tmp_path / "representation.json").unlink()
    st_config = tmp_path / "config_sentence_transformers.json"
    st_config.write_text(json.dumps({} if similarity is None else {"similarity_fn_name": similarity}))
    with caplog.at_level(logging.INFO, logger="common.representation"):
        assert rep.folder_config(str(tmp_path)).normalize is expected
    said = "similarity_fn_name" if similarity else "default"
    assert any(said in r.getMessage() and (similarity or "cosine") in r.getMessage() for r in caplog.records)
    queries, docs = TEXTS[:2], TEXTS[2:] + ["a little longer query than the first one"]
    torch.testing.assert_close(_our_scores(tmp_path, tokenizer, queries, docs), _st_scores(tmp_path, queries, docs),
                               atol=1e-5, rtol=1e-4)


def test_unsupported_sentence_transformers_similarity_is_refused(tiny_mlm_dir, tokenizer, tmp_path):
    Encoder.from_pretrained(str(tiny_mlm_dir), RepresentationConfig(kind="cls")).save_pretrained(tmp_path, tokenizer)
    (tmp_path / "representation.json").unlink()
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "manhattan"}))
    with pytest.raises(ValueError, match="config_sentence_transformers.json: similarity_fn_name 'manhattan'"):
        rep.folder_config(str(tmp_path))


@pytest.mark.parametrize("kind,normalize", [("cls", False), ("mean", False), ("mean", True), ("dupmae", False)])
def test_exports_score_the_same_in_sentence_transformers(tiny_mlm_dir, tokenizer, tmp_path, kind, normalize):
    """Every export kind tells sentence-transformers the similarity the project scores it with (its dense half for
    dupmae): an unnormalized cls/mean export is a dot-product model, not sentence-transformers' default cosine."""
    cfg = RepresentationConfig(kind=kind, normalize=normalize, dense_dim=16)
    Encoder.from_pretrained(str(tiny_mlm_dir), cfg).save_pretrained(tmp_path, tokenizer)
    queries, docs = TEXTS[:2], TEXTS[2:]
    enc = Encoder.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ours = enc(**batch(tokenizer, queries)).dense @ enc(**batch(tokenizer, docs)).dense.T
    torch.testing.assert_close(_st_scores(tmp_path, queries, docs), ours, atol=1e-5, rtol=1e-4)
