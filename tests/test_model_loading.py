"""common/model_loading.py: transformers' load table held back, our report instead, and the table kept on errors."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertModel

from common.model_loading import load_pretrained

CONFIG = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
              max_position_embeddings=32)
HEAD = ["cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight"]


class Collect(logging.Handler):
    """Records as they reach a logger, whether or not it propagates (transformers' does not, unless CI=true)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def said():
    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils", "common.model_loading")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.INFO)
    yield collect.records
    for logger, level in zip(loggers, levels):
        logger.removeHandler(collect)
        logger.setLevel(level)


def _lines(records, level=logging.DEBUG):
    return [(r.name, r.getMessage()) for r in records if r.levelno >= level]


def test_a_checkpoint_without_head_is_said_at_info_and_its_head_listed(tmp_path, said):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path)
    filters = list(logging.getLogger("transformers.modeling_utils").filters)
    model, head = load_pretrained(AutoModelForMaskedLM, str(tmp_path))
    assert isinstance(model, BertForMaskedLM) and head == HEAD
    assert _lines(said, logging.WARNING) == []  # neither the LOAD REPORT nor the tied-bias line
    assert not any("LOAD REPORT" in message for _, message in _lines(said))
    # the unused pooler of the checkpoint is said at INFO, once
    assert [m for n, m in _lines(said) if n == "common.model_loading"] == [
        f"{tmp_path}: 2 checkpoint tensors unused by BertForMaskedLM (pooler.dense.bias, pooler.dense.weight)"]
    assert logging.getLogger("transformers.modeling_utils").filters == filters  # the hold is gone after the load


def test_a_masked_lm_read_by_a_bare_encoder_has_no_head(tmp_path, said):
    BertForMaskedLM(BertConfig(**CONFIG)).save_pretrained(tmp_path)
    model, head = load_pretrained(AutoModel, str(tmp_path))
    assert isinstance(model, BertModel) and head == []
    assert _lines(said, logging.WARNING) == []
    infos = [m for n, m in _lines(said) if n == "common.model_loading"]
    assert infos[0] == f"{tmp_path} has no pooler (unused here): initialized 2 tensors"
    assert infos[1].startswith(f"{tmp_path}: 5 checkpoint tensors unused by BertModel (cls.predictions.")


def test_missing_encoder_weights_are_a_warning_naming_them(tmp_path, said):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    gone = "encoder.layer.0.attention.self.query.weight"
    del weights[gone]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, head = load_pretrained(AutoModelForMaskedLM, str(tmp_path))
    assert head == HEAD
    assert [m for n, m in _lines(said, logging.WARNING)] == [
        f"{tmp_path} lacks 1 encoder tensors, initialized at random: bert.{gone}"]
    assert torch.isfinite(model.bert.encoder.layer[0].attention.self.query.weight).all()


def test_a_failed_load_still_logs_the_report_its_error_points_at(tmp_path, said):
    BertModel(BertConfig(**CONFIG)).save_pretrained(tmp_path)
    wider = BertConfig(**{**CONFIG, "vocab_size": 60})
    with pytest.raises(RuntimeError, match="above report"):
        load_pretrained(AutoModel, str(tmp_path), config=wider)
    reports = [m for n, m in _lines(said, logging.WARNING) if "LOAD REPORT" in m]
    assert len(reports) == 1 and "embeddings.word_embeddings.weight" in reports[0]
