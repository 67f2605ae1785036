"""The default InfoNCE temperature by score kind, and the calibration for dupmae's paper setting (issue 25): raw MLM
logits in the sparse half make scores whose scale is the MLM head's (hundreds to thousands), where a fixed 1.0 turns
the softmax into a hard max."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch

from common.representation import RepresentationConfig
from finetune.loss import (COSINE_TEMPERATURE, DOT_TEMPERATURE, calibrated_temperature, default_temperature,
                           learning_share, positive_labels)


@pytest.mark.parametrize("config,expected", [
    (RepresentationConfig(kind="cls"), DOT_TEMPERATURE),
    (RepresentationConfig(kind="mean"), DOT_TEMPERATURE),
    (RepresentationConfig(kind="mean", normalize=True), COSINE_TEMPERATURE),
    (RepresentationConfig(kind="dupmae", normalize=True), COSINE_TEMPERATURE),
    (RepresentationConfig(kind="dupmae"), None),  # the paper's: raw logits, nothing normalized -> calibrate
    (RepresentationConfig(kind="dupmae", sparse_values="probs", sparse_weight=0.2), DOT_TEMPERATURE),
    (RepresentationConfig(kind="dupmae", sparse_weight=0.0), DOT_TEMPERATURE),
])
def test_default_temperature_by_score_kind(config, expected):
    assert default_temperature(config) == expected


def test_calibrated_temperature_is_the_mean_per_query_spread():
    scores = torch.tensor([[0.0, 2.0, 4.0], [10.0, 10.0, 16.0]])
    assert calibrated_temperature(scores).item() == pytest.approx((2.0 + 12**0.5) / 2)
    assert calibrated_temperature(torch.full((2, 3), 7.0)).item() == 1.0


def _paper_scale_scores(queries: int = 64, passages: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores shaped like the measurement: near 3,900, per-query spread about 250, positives mostly first."""
    generator = torch.Generator().manual_seed(0)
    scores = 3900 + 250 * torch.randn(queries, queries * passages, generator=generator)
    labels = positive_labels(queries, passages)
    scores[torch.arange(queries), labels] += 300
    return scores, labels


def test_calibration_keeps_queries_learning_where_one_is_a_hard_max():
    scores, labels = _paper_scale_scores()
    wrong = (scores.argmax(1) != labels).float().mean().item()
    assert learning_share(scores, labels, DOT_TEMPERATURE).item() == pytest.approx(wrong, abs=0.02)
    assert learning_share(scores, labels, calibrated_temperature(scores)).item() > 0.9


@pytest.fixture(scope="module")
def paper_minilm(minilm_path, tmp_path_factory):
    """The packaged MiniLM saved with the paper's dupmae representation (its MLM head is initialized fresh)."""
    folder = tmp_path_factory.mktemp("minilm_paper")
    shutil.copytree(minilm_path, folder, dirs_exist_ok=True)
    (folder / "representation.json").write_text(json.dumps(asdict(RepresentationConfig(kind="dupmae"))))
    return folder


def test_bi_encoder_calibrates_once_and_a_checkpoint_keeps_it(paper_minilm, tmp_path):
    """Under the paper's setting the fine-tuning model calibrates on its first batch, keeps that temperature, and
    carries it in its state dict (a resume loads it instead of calibrating on another batch)."""
    from benchmarks.smoke import NEAR_MISSES, TOPICS
    from common.tokenizer import load_tokenizer
    from finetune.config import FinetuneConfig
    from finetune.data import Collator
    from finetune.model import BiEncoder

    cfg = FinetuneConfig(model_name_or_path=str(paper_minilm), representation="dupmae", data_dir="d",
                         output_dir=str(tmp_path), deepspeed="ds.json", train_group_size=2)
    model = BiEncoder.from_config(cfg).eval()
    assert model.temperature is None and model.calibrated.item() == 0
    passages = [p for (positive, _), negative in zip(TOPICS, NEAR_MISSES) for p in (positive, negative)]
    batch = Collator(load_tokenizer(str(paper_minilm)), 32, 64)([q for _, q in TOPICS], passages)
    with torch.no_grad():
        out = model(*batch)
    temperature = model.calibrated.item()
    assert temperature == pytest.approx(calibrated_temperature(out.scores).item())
    assert temperature > 10 * DOT_TEMPERATURE  # raw-logit scores spread over far more than 1
    labels = positive_labels(len(TOPICS), 2)
    assert learning_share(out.scores, labels, DOT_TEMPERATURE).item() <= 0.25  # 1.0 would be a hard max here
    assert out.learning.item() >= 0.75
    with torch.no_grad():  # another batch: the temperature stays
        model(*Collator(load_tokenizer(str(paper_minilm)), 32, 64)([q for _, q in TOPICS[::-1]], passages[::-1]))
    assert model.calibrated.item() == temperature
    resumed = BiEncoder.from_config(cfg)
    resumed.load_state_dict(model.state_dict())
    assert resumed.calibrated.item() == temperature
