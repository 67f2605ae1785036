"""The pretrain_step baselines: loading the official code from a local copy, its batch format, and the
re-implementation's decoder attention."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from benchmarks.full_logits import official_attention
from benchmarks.official_dupmae import DECODER_TO_OFFICIAL, load_official, official_batch, official_name

#: A stand-in for the official modeling_duplex.py: the published name of the OT method, no `sparse_embedding`.
FAKE_MODELING = textwrap.dedent("""
    class DupMAEForPretraining:
        def __init__(self, model_args, path):
            self.model_args, self.path = model_args, path

        def ot_embedding(self, logits, attention_mask):
            return "ot"

        @classmethod
        def from_pretrained(cls, model_args, *args, **kwargs):
            return cls(model_args, args[0])
""")


def _write_package(folder):
    folder.mkdir(parents=True)
    (folder / "modeling_duplex.py").write_text(FAKE_MODELING)
    return folder


def test_load_official_from_the_package_folder_aliases_sparse_embedding(tmp_path):
    package = _write_package(tmp_path / "official_copy")
    model = load_official(str(package), "/models/m", bow_loss_weight=0.1)
    assert model.path == "/models/m" and model.model_args.bow_loss_weight == 0.1
    assert model.sparse_embedding(None, None) == "ot"


def test_load_official_refuses_next_to_our_pretrain_package(tmp_path):
    import pretrain  # noqa: F401  (ours: the official package has the same name)

    _write_package(tmp_path / "src" / "pretrain")
    with pytest.raises(SystemExit, match="already imported"):
        load_official(str(tmp_path / "src"), "m", 1.0)
    with pytest.raises(SystemExit, match="no modeling_duplex.py"):
        load_official(str(tmp_path), "m", 1.0)


def test_official_batch_renames_and_densifies():
    batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 5, -100]]), "decoder_input_ids": torch.tensor([[1, 5, 2]]),
             "decoder_attention_mask": torch.eye(3, dtype=torch.bool)[None],
             "decoder_labels": torch.tensor([[-100, 5, -100]]),
             "bow_ids": torch.tensor([[5, 7, 0]]), "bow_weights": torch.tensor([[0.5, 0.5, 0.0]])}
    out = official_batch(batch, vocab_size=10)
    assert out["encoder_input_ids"] is batch["input_ids"] and out["encoder_labels"] is batch["labels"]
    assert out["decoder_attention_mask"].dtype == torch.int64
    assert torch.equal(out["decoder_attention_mask"], torch.eye(3, dtype=torch.long)[None])
    expected = torch.zeros(1, 10)
    expected[0, 5] = expected[0, 7] = 0.5
    assert torch.equal(out["bag_word_weight"], expected)


def test_official_attention_matches_sdpa_without_dropout():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=generator) for _ in range(3))
    visible = torch.rand(2, 1, 6, 6, generator=generator) < 0.5
    visible[..., 0] = True  # every row sees position 0, as the collator guarantees
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    torch.testing.assert_close(official_attention(q, k, v, visible, 0.0), expected)


def test_official_batch_builds_the_official_bow_target_or_none():
    batch = {"input_ids": torch.tensor([[1, 5, 5, 7, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
             "labels": torch.full((1, 6), -100), "decoder_input_ids": torch.tensor([[1, 5, 5, 7, 2, 0]]),
             "decoder_attention_mask": torch.ones(1, 6, 6, dtype=torch.bool),
             "decoder_labels": torch.tensor([[-100, 5, 5, 7, -100, -100]]),
             "bow_ids": torch.tensor([[5, 7]]), "bow_weights": torch.tensor([[0.5, 0.5]])}
    dense = official_batch(batch, vocab_size=10, bow_target="official")["bag_word_weight"]
    assert dense[0, 5] == dense[0, 7] == pytest.approx(1 / 3) and dense.sum() == pytest.approx(2 / 3)  # |unique| / n
    assert "bag_word_weight" not in official_batch(batch, vocab_size=10, bow_target="none")


def test_every_parameter_of_ours_has_one_official_name():
    from transformers import BertConfig, BertForMaskedLM

    from pretrain.modeling import DupMAEConfig, DupMAEModel

    mlm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32))
    model = DupMAEModel(mlm, DupMAEConfig())
    names = [official_name(name) for name, _ in model.named_parameters()]
    assert len(set(names)) == len(names)
    assert {n.split(".")[0] for n in names} == {"lm", "c_head"}
    assert {name.rsplit(".", 1)[0] for name, _ in model.decoder.named_parameters()} == set(DECODER_TO_OFFICIAL)
    assert official_name("decoder.attention_norm.weight") == "c_head.attention.output.LayerNorm.weight"
    with pytest.raises(KeyError):
        official_name("projection.weight")
