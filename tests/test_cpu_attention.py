"""pretrain.cpu_attention: the fast dropout mask's distribution, exactness against a plain reference, HF wiring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.cpu_attention import (ATTN_IMPLEMENTATION, attention, drop_mask, dropout_probability,
                                    use_fast_cpu_attention)

CPU = torch.device("cpu")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_mask_drops_p_everywhere_and_replays_with_the_seed(p):
    n = 400_000
    torch.manual_seed(3)
    dropped = drop_mask((n,), p, CPU)
    torch.manual_seed(3)
    assert torch.equal(dropped, drop_mask((n,), p, CPU))
    p_real = dropout_probability(p)
    sigma = math.sqrt(p_real * (1 - p_real) / (n / 4))
    for lane in range(4):  # each 16-bit slice of the int64 words, the top one included, drops at rate p'
        assert abs(dropped[lane::4].float().mean().item() - p_real) < 5 * sigma
    pairs = (dropped[0::2] & dropped[1::2]).float().mean().item()  # neighbouring slices independent
    assert abs(pairs - p_real ** 2) < 5 * math.sqrt(p_real ** 2 / (n / 2))


def test_drop_mask_extremes_and_rounding():
    assert not drop_mask((1000,), 0.0, CPU).any()
    assert drop_mask((1000,), 1.0, CPU).all()
    assert dropout_probability(0.1) == 6554 / 65536


def _qkv(seed: int, shape=(2, 3, 7, 4)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)]


def _masks():
    visible = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(1)) < 0.6
    visible[..., 0] = True  # every row sees something
    additive = torch.where(visible, 0.0, -1e4).expand(2, 3, 7, 7)
    return [None, visible, additive]


@pytest.mark.parametrize("mask_index", [0, 1, 2])
def test_without_dropout_it_is_sdpa(mask_index):
    q, k, v = _qkv(0)
    mask = _masks()[mask_index]
    torch.testing.assert_close(attention(q, k, v, mask, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("mask_index", [0, 1, 2])
def test_with_dropout_values_and_gradients_equal_a_plain_reference(mask_index):
    p, mask = 0.3, _masks()[mask_index]
    q, k, v = _qkv(1)
    torch.manual_seed(7)
    out = attention(q, k, v, mask, p)
    grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), (q, k, v))

    rq, rk, rv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(7)  # the reference draws the same mask: drop_mask is the only consumer of the generator
    keep = ~drop_mask((2, 3, 7, 7), p, CPU)
    scores = rq @ rk.transpose(-1, -2) / math.sqrt(4)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, -1) * keep / (1 - dropout_probability(p))
    ref = probs @ rv
    ref_grads = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref).sin()).sum(), (rq, rk, rv))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config, add_pooling_layer=False)


def test_hf_model_switches_and_is_unchanged_in_eval(tmp_path):
    from transformers import AutoModel

    plain, fast = _tiny_bert(), _tiny_bert()
    assert use_fast_cpu_attention(fast)
    assert fast.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(ids, mask).last_hidden_state, plain.eval()(ids, mask).last_hidden_state)
    torch.manual_seed(0)
    trained = fast.train()(ids, mask).last_hidden_state  # dropout path: runs, differs from eval
    assert torch.isfinite(trained).all() and not torch.allclose(trained, plain(ids, mask).last_hidden_state)
    fast.save_pretrained(tmp_path)  # a saved model loads anywhere, without our registration
    assert AutoModel.from_pretrained(tmp_path).config._attn_implementation != ATTN_IMPLEMENTATION


def test_models_not_on_sdpa_are_left_alone():
    model = _tiny_bert()
    model.set_attn_implementation("eager")
    assert not use_fast_cpu_attention(model)
    assert model.config._attn_implementation == "eager"
