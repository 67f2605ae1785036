"""pretrain.modeling / linear_ce / bow_loss and common.vocab_pooling against plain per-sample references, bf16,
loading and export."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.collator import CollatorConfig, DupMAECollator
from pretrain.linear_ce import linear_cross_entropy
from pretrain.modeling import DECODER_FILE, DupMAEConfig, DupMAEModel
from common import vocab_pooling
from common.vocab_pooling import vocab_max_pool
from pretrain.bow_loss import bow_loss

VOCAB = 97
PAD, CLS, SEP, MASK = 0, 1, 2, 3
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_model(config: DupMAEConfig | None = None, vocab_size: int = VOCAB, seed: int = 0) -> DupMAEModel:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    mlm = BertForMaskedLM(BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **TINY))
    model = DupMAEModel(mlm, config or DupMAEConfig())
    with torch.no_grad():  # a non-zero output bias so the tests see it
        model.mlm.get_output_embeddings().bias.normal_(0, 0.5)
    return model.eval()


def random_rows(n_rows: int, seed: int, max_len: int = 20) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_rows):
        n = 1 if i == 0 else int(torch.randint(2, max_len + 1, (1,), generator=rng))
        ids = torch.randint(4, VOCAB, (n,), generator=rng)
        starts = torch.rand(n, generator=rng) < 0.6
        starts[0] = True
        unique = torch.unique(ids)
        rows.append({"input_ids": ids.tolist(), "word_starts": starts.tolist(), "bow_ids": unique.tolist(),
                     "bow_weights": [1.0 / len(unique)] * len(unique)})
    return rows


def make_batch(rows, seed=0, max_len=22):
    collator = DupMAECollator(CollatorConfig(max_seq_length=max_len), cls_id=CLS, sep_id=SEP, pad_id=PAD,
                              mask_id=MASK, vocab_size=VOCAB)
    return collator(rows, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- reference
def reference_losses(model: DupMAEModel, batch: dict) -> dict[str, torch.Tensor]:
    """The three losses with a loop per sample, per position, full-vocabulary logits, manual attention."""
    mlm, layer, cfg = model.mlm, model.decoder, model.config
    emb = mlm.bert.embeddings
    mlm_terms, dec_terms, bow_terms = [], [], []
    for b in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][b].sum())
        hidden = mlm.bert(input_ids=batch["input_ids"][b:b + 1, :length]).last_hidden_state[0]  # [l, H]
        logits = mlm.cls(hidden)  # [l, V]
        labels = batch["labels"][b, :length]
        for i in range(length):
            if labels[i] != -100:
                mlm_terms.append(F.cross_entropy(logits[i], labels[i]))
        cls = hidden[0]
        dec_ids = batch["decoder_input_ids"][b:b + 1, :length]
        kv = torch.cat([cls[None], emb(input_ids=dec_ids)[0, 1:]])  # [l, H]
        if cfg.decoder_query == "summed":  # the official RetroMAEForPretraining: p_i + h_CLS
            queries = emb.position_embeddings.weight[:length] + cls  # [l, H]
        else:
            queries = emb(inputs_embeds=cls.expand(1, length, -1))[0]  # [l, H]
        heads, width = layer.num_heads, kv.shape[1] // layer.num_heads
        keys, values = layer.key(kv), layer.value(kv)
        for i in range(1, length - 1):
            q = layer.query(queries[i])
            seen = [j for j in range(length) if batch["decoder_attention_mask"][b, i, j]]
            context = []
            for h in range(heads):
                part = slice(h * width, (h + 1) * width)
                scores = torch.stack([q[part] @ keys[j, part] for j in seen]) / math.sqrt(width)
                probs = torch.softmax(scores, 0)
                context.append(sum(p * values[j, part] for p, j in zip(probs, seen)))
            x = layer.attention_norm(layer.attention_output(torch.cat(context)) + queries[i])
            x = layer.output_norm(layer.output(layer.act(layer.intermediate(x))) + x)
            dec_terms.append(F.cross_entropy(mlm.cls(x), batch["decoder_labels"][b, i]))
        if cfg.objective == "official":  # ot_embedding: positions 1.. under the attention mask, [SEP] included
            kept = list(range(1, length))
        else:
            kept = [i for i in range(1, length - 1) if cfg.bow_include_masked or labels[i] == -100]
        if kept:
            mu = torch.stack([logits[i] for i in kept]).max(0).values
            log_p = torch.log_softmax(mu, -1)
            target = torch.zeros(log_p.shape[0])
            weights = batch["bow_weights"][b]
            for t, w in zip(batch["bow_ids"][b].tolist(), weights.tolist()):
                if cfg.objective == "official":  # the official collator: weight[t] = 1 / len(tokens), assigned
                    target[t] = 1 / (length - 2) if w > 0 else target[t]
                else:
                    target[t] += w
            bow_terms.append(-(target * log_p).sum())
    out = {"mlm_loss": torch.stack(mlm_terms).mean(), "decoder_loss": torch.stack(dec_terms).mean(),
           "bow_loss": torch.stack(bow_terms).mean()}
    out["loss"] = (cfg.mlm_weight * out["mlm_loss"] + cfg.decoder_weight * out["decoder_loss"]
                   + cfg.bow_weight * out["bow_loss"])
    return out


@pytest.mark.parametrize("include_masked", [False, True])
def test_losses_and_gradients_equal_reference(include_masked):
    config = DupMAEConfig(mlm_weight=0.7, decoder_weight=1.3, bow_weight=0.4, bow_include_masked=include_masked,
                          vocab_chunk_size=13, ce_chunk_size=7)
    model = tiny_model(config)
    batch = make_batch(random_rows(5, seed=3))
    assert batch["labels"][0].ne(-100).sum() == 1  # the 1-token row: masked, so nothing kept for BoW (paper mode)
    assert_equals_reference(model, batch, ("loss", "mlm_loss", "decoder_loss", "bow_loss"))


def assert_equals_reference(model: DupMAEModel, batch: dict, terms: tuple[str, ...]) -> None:
    """The model's loss terms and every gradient equal `reference_losses`'."""
    out = model(**batch)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = reference_losses(model, batch)
    ref["loss"].backward()
    for name in terms:
        assert getattr(out, name).item() == pytest.approx(ref[name].item(), abs=1e-5, rel=1e-5), name
    for name, param in model.named_parameters():
        assert torch.allclose(ours[name], param.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("bow_weight", [None, 0.0])
def test_official_objective_equals_reference(bow_weight):
    """--objective official: [SEP] and masked tokens pooled, 1/n targets, BoW weight 0.1; with --bow_weight 0 the
    RetroMAEForPretraining decoder query (p_i + h_CLS). The parity with the official code itself:
    benchmarks/official_parity.py."""
    config = DupMAEConfig(objective="official", bow_weight=bow_weight, vocab_chunk_size=13, ce_chunk_size=7)
    assert (config.bow_weight, config.decoder_query) == ((0.1, "embedded") if bow_weight is None else (0.0, "summed"))
    model = tiny_model(config)
    terms = ("loss", "mlm_loss", "decoder_loss", "bow_loss") if bow_weight is None else ("loss", "decoder_loss")
    assert_equals_reference(model, make_batch(random_rows(5, seed=5)), terms)


def test_official_bow_target_sums_to_unique_over_length():
    from pretrain.bow_loss import official_bow_weights

    weights = official_bow_weights(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]]),
                                   torch.tensor([5, 2]))
    assert torch.equal(weights, torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="objective"):
        DupMAEConfig(objective="offical")


def test_accuracies_and_recall_match_definitions():
    model = tiny_model()
    batch = make_batch(random_rows(6, seed=4))
    out = model(**batch)
    with torch.no_grad():
        hidden = model.mlm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.mlm.cls(hidden)
        masked = batch["labels"] != -100
        assert out.mlm_accuracy.item() == pytest.approx(
            (logits.argmax(-1)[masked] == batch["labels"][masked]).float().mean().item())
        keep = (batch["decoder_labels"] != -100) & ~masked
        recalls = []
        for b in range(len(keep)):
            if keep[b].any():
                mu = logits[b][keep[b]].max(0).values
                targets = set(batch["bow_ids"][b][batch["bow_weights"][b] > 0].tolist())
                top = set(mu.topk(len(targets)).indices.tolist())
                recalls.append(len(top & targets) / len(targets))
        assert out.bow_recall.item() == pytest.approx(sum(recalls) / len(recalls), abs=1e-6)
    assert 0 <= out.decoder_accuracy.item() <= 1


def test_retromae_mode_skips_bow():
    model = tiny_model(DupMAEConfig(bow_weight=0.0))
    batch = make_batch(random_rows(3, seed=5))
    del batch["bow_ids"], batch["bow_weights"]
    out = model(**batch)
    assert out.bow_loss.item() == 0.0 and out.bow_recall.item() == 0.0
    assert out.loss.item() == pytest.approx(out.mlm_loss.item() + out.decoder_loss.item(), rel=1e-6)


def _saved_bytes_loss_and_grads(model: DupMAEModel, batch: dict) -> tuple[int, list[float], list[torch.Tensor]]:
    """Bytes autograd keeps for backward, the loss terms, and every parameter's gradient (dropout on)."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    torch.manual_seed(11)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.train()(**batch)
    out.loss.backward()
    terms = [out.loss.item(), out.mlm_loss.item(), out.decoder_loss.item(), out.bow_loss.item()]
    return sum(saved.values()), terms, [p.grad.clone() for p in model.parameters()]


def test_gradient_checkpointing_keeps_less_and_changes_nothing():
    """Recomputation replays dropout with the saved RNG state: same losses and gradients, fewer saved bytes."""
    batch = make_batch(random_rows(6, seed=8))
    plain_bytes, plain_terms, plain_grads = _saved_bytes_loss_and_grads(tiny_model(), batch)
    ckpt_bytes, ckpt_terms, ckpt_grads = _saved_bytes_loss_and_grads(
        tiny_model(DupMAEConfig(gradient_checkpointing=True)), batch)
    assert ckpt_terms == pytest.approx(plain_terms, rel=1e-6)
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
    assert ckpt_bytes < 0.7 * plain_bytes


def test_cpu_attention_off_keeps_hf_sdpa_and_the_same_eval_losses():
    from pretrain.cpu_attention import ATTN_IMPLEMENTATION

    batch = make_batch(random_rows(5, seed=9))
    on, off = tiny_model(), tiny_model(DupMAEConfig(cpu_attention=False))
    assert on.mlm.config._attn_implementation == ATTN_IMPLEMENTATION
    assert off.mlm.config._attn_implementation == "sdpa"
    assert on(**batch).loss.item() == pytest.approx(off(**batch).loss.item(), rel=1e-6)  # eval: no dropout


def test_bf16_model_runs_and_tracks_fp32():
    batch = make_batch(random_rows(4, seed=6))
    fp32 = tiny_model()
    bf16 = tiny_model().to(torch.bfloat16)
    ref, out = fp32(**batch), bf16(**batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    grads = [p.grad for p in bf16.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)



#: A real run's per-row gradient factor w / Σ_v exp(z_v - max) is ~1e-8 (w = 1/#rows of a 32 × 512 batch, a
#: near-flat softmax over BERT's 30,522 words), below fp16's smallest number. Here: the real vocabulary, and
#: the loss weight 1/64 (exact) stands for a batch 64 times this test's ~400 rows.
FP16_VOCAB = 30522
FP16_TERMS = {"mlm": DupMAEConfig(1 / 64, 0.0, 0.0), "decoder": DupMAEConfig(0.0, 1 / 64, 0.0),
              "bow": DupMAEConfig(0.0, 0.0, 1.0)}


@pytest.mark.parametrize("loss_scale", [2.0 ** 16, 2.0 ** 15])  # DeepSpeed's first scale, and the next one
@pytest.mark.parametrize("term", list(FP16_TERMS))
def test_fp16_gradients_of_each_term_track_fp32(term, loss_scale):
    """An fp16 step as DeepSpeed runs it (loss × scale, backward, grads / scale) against fp32, one loss term at
    a time. Tolerance (relative L2 error of each gradient tensor): 2 % for MLM and decoder, and 1 % on the
    output rows of words absent from the batch, which get only the softmax half; 10 % for BoW, whose max-pool
    routes each word's gradient to one token and so moves it where fp16 rounding reorders near-ties (bf16
    differs as much). The attention key biases are left out: their exact gradient is 0 (softmax is
    shift-invariant), so fp32 holds only rounding noise there."""
    batch = make_batch(random_rows(16, seed=6, max_len=40), max_len=42)
    reference = tiny_model(FP16_TERMS[term], vocab_size=FP16_VOCAB).half().float()  # the same (rounded) weights
    reference(**batch).loss.backward()
    half = tiny_model(FP16_TERMS[term], vocab_size=FP16_VOCAB).half()
    (half(**batch).loss * loss_scale).backward()
    tolerance = 0.1 if term == "bow" else 0.02
    for (name, param), ours in zip(reference.named_parameters(), half.parameters()):
        if param.grad is None or "key.bias" in name or not param.grad.any():
            continue
        grad = ours.grad.float() / loss_scale
        assert torch.isfinite(grad).all(), name
        error = ((grad - param.grad).norm() / param.grad.norm()).item()
        assert error < tolerance, f"{name}: {error:.3f}"
    if term != "bow":  # the output rows of words absent from the batch get only the softmax half
        absent = torch.ones(FP16_VOCAB, dtype=torch.bool)
        absent[batch["input_ids"].unique()] = False
        theirs = reference.mlm.get_output_embeddings().weight.grad[absent]
        grad = half.mlm.get_output_embeddings().weight.grad[absent].float() / loss_scale
        assert ((grad - theirs).norm() / theirs.norm()).item() < 0.01

# -------------------------------------------------------------------------------------------- primitives
def test_linear_cross_entropy_equals_plain():
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(31, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(31, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(31, (23,))
    row_weights = torch.rand(23, dtype=torch.float64)
    total, per_row, correct = linear_cross_entropy(hidden, weight, bias, labels, row_weights, chunk_size=5)
    (2.5 * total).backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = hidden @ weight.T + bias
    plain_rows = F.cross_entropy(logits, labels, reduction="none")
    (2.5 * (row_weights * plain_rows).sum()).backward()
    assert total.item() == pytest.approx((row_weights * plain_rows).sum().item(), rel=1e-6)
    assert torch.allclose(per_row.double(), plain_rows.detach(), atol=1e-5)  # per-row values are fp32
    assert torch.equal(correct, logits.argmax(-1) == labels)
    for mine, theirs in zip(ours, (hidden.grad, weight.grad, bias.grad)):
        assert torch.allclose(mine.to(theirs.dtype), theirs, atol=1e-5)
    with torch.no_grad():  # no gradient work without grad mode, same value
        assert linear_cross_entropy(hidden, weight, None, labels, row_weights, 4)[0].item() == pytest.approx(
            (row_weights * F.cross_entropy(hidden @ weight.T, labels, reduction="none")).sum().item(), rel=1e-6)


def test_linear_cross_entropy_refuses_a_second_backward():
    hidden = torch.randn(4, 3, requires_grad=True)
    total, _, _ = linear_cross_entropy(hidden, torch.randn(7, 3), None, torch.tensor([0, 1, 2, 3]), torch.ones(4))
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        total.backward()


@pytest.mark.parametrize("sparse_backward", [True, False])
def test_chunked_max_pool_equals_plain_in_value_and_gradient(sparse_backward, monkeypatch):
    monkeypatch.setattr(vocab_pooling, "_use_sparse", lambda hidden: sparse_backward)
    monkeypatch.setattr(vocab_pooling, "_BACKWARD_SLICE_ELEMENTS", 4 * 6 * 5)  # several slices
    torch.manual_seed(1)
    hidden = torch.randn(4, 9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(29, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(4, 9) < 0.6
    keep[2] = False  # a row with no kept token: zero vector, no gradient
    keep[0, 0] = True
    upstream = torch.randn(4, 29, dtype=torch.float64)
    pooled = vocab_max_pool(hidden, weight, bias, keep, chunk_size=8)
    (pooled * upstream).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    scores = (hidden @ weight.T + bias).masked_fill(~keep[:, :, None], float("-inf"))
    plain = scores.max(1).values.masked_fill(~keep.any(1, keepdim=True), 0.0)
    (plain * upstream).sum().backward()
    assert torch.allclose(pooled, plain)
    assert torch.equal(pooled[2], torch.zeros(29, dtype=torch.float64))
    for mine, theirs in zip(ours, (hidden.grad, weight.grad, bias.grad)):
        assert torch.allclose(mine, theirs, atol=1e-10)


def test_bow_loss_masks_invalid_rows():
    pooled = torch.randn(3, 10)
    ids = torch.tensor([[1, 4, 0], [2, 0, 0], [5, 6, 7]])
    weights = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    loss, _ = bow_loss(pooled, ids, weights, torch.tensor([True, False, True]))
    log_p = torch.log_softmax(pooled, -1)
    expected = -(0.5 * log_p[0, 1] + 0.5 * log_p[0, 4] + 0.2 * log_p[2, 5] + 0.3 * log_p[2, 6] + 0.5 * log_p[2, 7]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------- config, loading
@pytest.mark.parametrize("kwargs", [dict(bow_weight=-1.0), dict(mlm_weight=0, decoder_weight=0, bow_weight=0),
                                    dict(vocab_chunk_size=0), dict(ce_chunk_size=-2)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="DupMAEConfig"):
        DupMAEConfig(**kwargs)


def test_overrides_and_config_file_build_random_models(minilm_path, tmp_path):
    model = DupMAEModel.from_pretrained(minilm_path, DupMAEConfig(), model_config_overrides="hidden_size=32,"
                                        "num_hidden_layers=1,num_attention_heads=2,intermediate_size=64")
    assert model.mlm.config.hidden_size == 32 and model.mlm.config.num_hidden_layers == 1
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "bert", "vocab_size": 50, **TINY}))
    model = DupMAEModel.from_pretrained(None, DupMAEConfig(), model_config_file=str(path))
    assert model.mlm.config.vocab_size == 50 and model.decoder.query.in_features == 32
    with pytest.raises(ValueError, match="not both"):
        DupMAEModel.from_pretrained(None, DupMAEConfig(), "hidden_size=8", str(path))
    with pytest.raises(ValueError, match="no_such_field"):
        DupMAEModel.from_pretrained(minilm_path, DupMAEConfig(), model_config_overrides="no_such_field=3")
    with pytest.raises(ValueError, match="cannot build model"):
        DupMAEModel.from_pretrained(str(tmp_path / "missing"), DupMAEConfig())


def test_minilm_without_head_is_initialized_and_says_so(minilm_path, caplog):
    with caplog.at_level(logging.INFO, logger="pretrain.modeling"):
        model = DupMAEModel.from_pretrained(minilm_path, DupMAEConfig())
    said = [r for r in caplog.records if "no MLM head" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"]  # the documented case: one INFO line, no warning
    head = model.mlm.get_output_embeddings()
    assert head.weight is model.mlm.get_input_embeddings().weight  # tied to the word embeddings
    assert torch.count_nonzero(head.bias) == 0


def test_export_round_trip(minilm_path, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    from common.representation import Encoder, RepresentationConfig
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    model = tiny_model(vocab_size=len(tokenizer), seed=7)
    model.save_export(str(tmp_path), tokenizer)
    inputs = tokenizer(["a small test sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.mlm.bert(**inputs).last_hidden_state
        logits = model.mlm(**inputs).logits
        assert torch.allclose(AutoModel.from_pretrained(tmp_path).eval()(**inputs).last_hidden_state, expected,
                              atol=1e-6)
        assert torch.allclose(AutoModelForMaskedLM.from_pretrained(tmp_path).eval()(**inputs).logits, logits,
                              atol=1e-5)
        # a random-init model is a plain encoder: the paper's representation, [CLS] through W to 384 dims
        encoder = Encoder.from_pretrained(str(tmp_path)).eval()
        assert encoder.config == RepresentationConfig(kind="dupmae", pooling="cls", dense_dim=384)
        torch.testing.assert_close(encoder(**inputs).dense, encoder.projection(expected[:, 0]))
    assert (tmp_path / DECODER_FILE).is_file()
    restored = DupMAEModel.from_pretrained(str(tmp_path), DupMAEConfig())
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(restored.decoder.state_dict()[key], value), key


def test_mlm_mode_builds_no_decoder_and_scores_the_same_mlm_term():
    full = tiny_model()
    mlm_only = DupMAEModel(full.mlm, DupMAEConfig(decoder_weight=0.0, bow_weight=0.0)).eval()
    assert mlm_only.decoder is None
    assert not any(name.startswith("decoder.") for name, _ in mlm_only.named_parameters())
    batch = make_batch(random_rows(4, seed=9))
    out, reference = mlm_only(**batch), full(**batch)
    assert out.mlm_loss.item() == pytest.approx(reference.mlm_loss.item(), rel=1e-6)
    assert out.decoder_loss.item() == 0.0 and out.bow_loss.item() == 0.0 and out.bow_recall.item() == 0.0
    assert out.loss.item() == pytest.approx(out.mlm_loss.item(), rel=1e-6)
    out.loss.backward()
    assert full.mlm.cls.predictions.transform.dense.weight.grad.abs().sum() > 0


def test_export_without_decoder_round_trips(minilm_path, tmp_path):
    from common.tokenizer import load_tokenizer

    model = DupMAEModel(tiny_model(vocab_size=len(load_tokenizer(minilm_path))).mlm,
                        DupMAEConfig(decoder_weight=0.0, bow_weight=0.0))
    model.save_export(str(tmp_path), load_tokenizer(minilm_path))
    assert not (tmp_path / DECODER_FILE).exists()
    assert DupMAEModel.from_pretrained(str(tmp_path), DupMAEConfig()).decoder is not None  # a new one, untrained


def test_init_head_bias_sets_the_centered_log_prior():
    model = tiny_model()
    prior = torch.log_softmax(torch.randn(VOCAB, dtype=torch.float64), 0)
    model.init_head_bias(prior)
    bias = model.mlm.get_output_embeddings().bias
    torch.testing.assert_close(bias, (prior - prior.mean()).float())
    assert bias is model.mlm.cls.predictions.bias  # the head's one bias (tied), not a copy


def test_minilm_export_dense_half_is_the_packaged_embedding(minilm_path, tmp_path):
    """Before any training step the dupmae export of a sentence embedder scores with its own embedding, and
    truncates where it does (max_seq_length 256, not the position limit 512)."""
    from sentence_transformers import SentenceTransformer

    from common.representation import Encoder, RepresentationConfig
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    DupMAEModel.from_pretrained(minilm_path, DupMAEConfig()).save_export(str(tmp_path), tokenizer)
    encoder = Encoder.from_pretrained(str(tmp_path)).eval()
    assert encoder.config == RepresentationConfig(kind="dupmae", pooling="mean", normalize=True, dense_dim=384,
                                                  sparse_bias=False, sparse_values="probs", sparse_weight=0.2)
    assert encoder.max_seq_length == Encoder.from_pretrained(minilm_path).max_seq_length == 256
    texts = ["Nanotechnologies track stem cells.", "low birth weight and perinatal mortality"]
    with torch.no_grad():
        ours = encoder(**tokenizer(texts, padding=True, return_tensors="pt"))
    packaged = SentenceTransformer(minilm_path, device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours.dense, packaged, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours.vocab.norm(dim=-1), torch.ones(2))  # the sparse half is normalized too
