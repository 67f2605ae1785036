"""`--bf16 auto|true|false` (common.precision): the decision with the CPU flags and CUDA mocked, the flag's parsing in
every stage, the DeepSpeed JSON that follows it, and bf16 against fp32 where it runs: pre-training losses and
evaluation's nDCG@10."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser

from benchmarks.smoke import tiny_beir

from common import precision
from common.precision import Bf16Choice, decide_bf16, decide_deepspeed_bf16, native_bf16, parse_bf16

REPO = Path(__file__).resolve().parents[1]
AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}  # Sapphire Rapids
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}  # e.g. AMD EPYC Zen 4
AVX2 = {"avx2", "fma"}


# ---------------------------------------------------------------------------------------------- the decision
@pytest.mark.parametrize("flags,expected,why", [
    (AMX, True, "amx_bf16"),
    (AVX512_BF16, True, "avx512_bf16"),  # without AMX: measured not slower (common.precision's docstring)
    (AVX2, False, "neither amx_bf16 nor avx512_bf16"),
    (set(), False, "neither"),
])
def test_auto_follows_the_cpu_flags(flags, expected, why):
    choice = decide_bf16("auto", "cpu", flags)
    assert choice.enabled is expected and why in choice.reason and choice.reason.startswith("--bf16 auto")
    assert decide_bf16("true", "cpu", flags).enabled is True  # forced either way
    assert decide_bf16("false", "cpu", flags) == Bf16Choice(False, "--bf16 false")
    forced = decide_bf16("true", "cpu", flags)
    assert ("expect it slower" in forced.reason) is forced.emulated is (not expected)


def test_cpu_flags_read_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert precision.cpu_flags(str(tmp_path / "absent")) == set()  # not Linux: no flags, fp32
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})  # the default flags come from cpu_flags()
    assert native_bf16("cpu") == (True, "the CPU reports amx_bf16")


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_mocked_cuda_device(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100")
    choice = decide_bf16("auto", torch.device("cuda"), flags=AVX2)  # the CPU's flags do not matter for CUDA
    assert choice.enabled is supported
    assert ("H100 supports bf16" in choice.reason) is supported


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("auto", "auto"), ("AUTO", "auto"), (True, "true"),
                                            ("True", "true"), ("yes", "true"), ("1", "true"), (False, "false"),
                                            ("false", "false"), ("no", "false"), ("0", "false")])
def test_parse_bf16(value, expected):
    assert parse_bf16(value) == expected


def test_parse_bf16_rejects_other_values():
    with pytest.raises(ValueError, match="auto, true or false"):
        parse_bf16("fp16")


# ------------------------------------------------------------------------------------------------ the flag
def _stages():
    from evaluation.config import EvalConfig
    from finetune.config import FinetuneConfig
    from finetune.mine_negatives import MiningConfig
    from pretrain.arguments import TrainingArguments

    return {"evaluation": (EvalConfig, ["--datasets", "scifact", "--output_dir", "o"]),
            "finetune": (FinetuneConfig, ["--data_dir", "d", "--output_dir", "o", "--deepspeed", "ds.json"]),
            "mining": (MiningConfig, ["--data_dir", "d", "--out", "negs.jsonl"]),
            "pretrain": (TrainingArguments, ["--output_dir", "o"])}


@pytest.mark.parametrize("stage", ["evaluation", "finetune", "mining", "pretrain"])
@pytest.mark.parametrize("flags,expected", [([], "auto"), (["--bf16"], "true"), (["--bf16", "true"], "true"),
                                            (["--bf16", "False"], "false"), (["--bf16", "auto"], "auto")])
def test_every_stage_parses_bf16_alike(stage, flags, expected):
    config, required = _stages()[stage]
    for argv in ([*required, *flags], [*flags, *required]):  # a bare --bf16 before an option takes no value
        (cfg,) = HfArgumentParser(config).parse_args_into_dataclasses(argv)
        assert cfg.bf16 == expected, argv


@pytest.mark.parametrize("stage", ["evaluation", "finetune", "mining", "pretrain"])
def test_every_stage_rejects_a_bad_bf16(stage):
    config, required = _stages()[stage]
    with pytest.raises(ValueError, match="--bf16 must be auto, true or false"):
        HfArgumentParser(config).parse_args_into_dataclasses([*required, "--bf16", "maybe"])


# ---------------------------------------------------------------------------------------- the DeepSpeed JSON
@pytest.fixture
def amx_cpu(monkeypatch):
    """A CPU training device that reports AMX."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))


@pytest.fixture
def avx2_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2)
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))


def _pretrain_config(json_name: str, **flags) -> dict:
    from pretrain.arguments import TrainingArguments, deepspeed_config

    args = TrainingArguments(output_dir="/o", deepspeed=str(REPO / "ds_configs" / json_name), **flags)
    return deepspeed_config(args, world_size=1, total_steps=10)


def test_pretrain_json_follows_auto(amx_cpu, caplog):
    with caplog.at_level(logging.INFO):
        assert _pretrain_config("zero2.json")["bf16"]["enabled"] is True
    assert "pre-training precision: bf16 (--bf16 auto: the CPU reports amx_bf16)" in caplog.text
    assert _pretrain_config("zero2.json", bf16="false")["bf16"]["enabled"] is False
    # zero2_cpu.json stays the explicit fp32 config, on AMX too; forcing bf16 onto it is an error
    assert _pretrain_config("zero2_cpu.json")["bf16"]["enabled"] is False
    from pretrain.arguments import ConfigError

    with pytest.raises(ConfigError, match="bf16.enabled is false but --bf16 true"):
        _pretrain_config("zero2_cpu.json", bf16="true")
    # fp16 configs keep bf16 off under auto
    fp16 = _pretrain_config("zero2_fp16.json")
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False


def test_pretrain_json_follows_auto_on_avx2(avx2_cpu, caplog):
    with caplog.at_level(logging.INFO):
        assert _pretrain_config("zero2.json")["bf16"]["enabled"] is False
    assert "pre-training precision: fp32 (--bf16 auto: the CPU reports neither" in caplog.text
    caplog.clear()
    assert _pretrain_config("zero2.json", bf16="true")["bf16"]["enabled"] is True
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "expect it slower" in caplog.text


def test_finetune_json_follows_auto(avx2_cpu, monkeypatch):
    from finetune.config import FinetuneConfig
    from finetune.trainer import deepspeed_config

    for name in ("finetune_cpu.json", "finetune_zero2.json"):  # no bf16 section, and "auto"
        cfg = FinetuneConfig(data_dir="d", output_dir="o", deepspeed=str(REPO / "ds_configs" / name))
        assert deepspeed_config(cfg, 1, 10)["bf16"]["enabled"] is False
        with monkeypatch.context() as amx:
            amx.setattr(precision, "cpu_flags", lambda: AMX)
            assert deepspeed_config(cfg, 1, 10)["bf16"]["enabled"] is True
            cfg.bf16 = "false"
            assert deepspeed_config(cfg, 1, 10)["bf16"]["enabled"] is False


def test_explicit_json_and_contradicting_flag():
    with pytest.raises(ValueError, match="bf16.enabled is true but --bf16 false"):
        decide_deepspeed_bf16({"bf16": {"enabled": True}}, "false", "x.json", device="cpu")
    choice = decide_deepspeed_bf16({"bf16": {"enabled": True}}, "auto", "x.json", device="cpu")
    assert choice == Bf16Choice(True, "x.json sets bf16.enabled true")


# ----------------------------------------------------------------------------------- bf16 against fp32, run
def _env() -> dict[str, str]:
    """A stage's subprocess: offline, one CPU thread, this checkout's modules (not an editable install's)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


#: bf16 pre-training may differ from fp32 by this much (relative) in each of the first 5 steps' losses: the bf16
#: working copy of the weights and bf16 activations moved this run's loss (~21.9, three terms) by at most 6.2e-4
#: relative (fp32 21.956 .. 21.717, bf16 21.959 .. 21.730); a gap near 1e-2 would mean a term computed in bf16
#: where it must not be (softmax, loss reductions).
PRETRAIN_LOSS_RTOL = 5e-3


def test_bf16_pretraining_losses_track_fp32(tmp_path, minilm_path):
    from test_pretrain_data import make_texts, write_shards

    from common.tokenizer import load_tokenizer

    shards = write_shards(tmp_path / "shards", load_tokenizer(minilm_path), make_texts(24), max_seq_length=64)
    losses, logs = {}, {}
    for bf16 in ("false", "true"):
        out = tmp_path / bf16
        done = subprocess.run(
            [sys.executable, "pretrain/main.py", "--deepspeed", "ds_configs/zero2.json", "--bf16", bf16,
             "--data_dir", str(shards), "--output_dir", str(out), "--config_overrides",
             "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64", "--max_seq_length", "64",
             "--per_device_train_batch_size", "4", "--max_steps", "5", "--logging_steps", "1", "--save_steps", "0",
             "--learning_rate", "1e-3", "--disable_tqdm"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
            env=_env())
        assert done.returncode == 0, done.stderr[-3000:]
        logs[bf16] = done.stderr
        losses[bf16] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "pre-training precision: fp32 (--bf16 false)" in logs["false"]
    assert "pre-training precision: bf16 (--bf16 true" in logs["true"]
    assert len(losses["true"]) == len(losses["false"]) == 5
    assert losses["true"] != losses["false"]  # bf16 really ran
    print("losses fp32", losses["false"], "bf16", losses["true"])
    assert losses["true"] == pytest.approx(losses["false"], rel=PRETRAIN_LOSS_RTOL)


def test_bf16_evaluation_within_0002_ndcg_of_fp32(tmp_path, minilm_path, caplog):
    from evaluation.config import EvalConfig
    from evaluation.pipeline import run

    beir = tiny_beir(tmp_path / "beir")  # each query's answer, and near misses that share its words
    results, runs = {}, {}
    for bf16 in ("false", "true"):
        with caplog.at_level(logging.INFO):
            results[bf16] = run(EvalConfig(datasets=[str(beir)], output_dir=str(tmp_path / bf16), offline=True,
                                           model_name_or_path=minilm_path, representation="mean", normalize=True,
                                           bf16=bf16, device="cpu"))
        runs[bf16] = (tmp_path / bf16 / "beir.run").read_text()
    assert "evaluation precision: bf16 (--bf16 true" in caplog.text
    assert "evaluation precision: fp32 (--bf16 false)" in caplog.text
    assert runs["true"] != runs["false"]  # the scores differ: bf16 really ran
    fp32, bf16 = results["false"]["beir"]["nDCG@10"], results["true"]["beir"]["nDCG@10"]
    print(f"nDCG@10 fp32 {fp32:.5f} bf16 {bf16:.5f}")
    assert fp32 > 0.8  # the packaged model answers these queries
    assert abs(bf16 - fp32) <= 0.002


def test_finetune_info_nce_softmax_runs_in_fp32_under_bf16():
    from finetune.loss import info_nce

    torch.manual_seed(0)
    scores = torch.randn(4, 12).mul(0.3).bfloat16().requires_grad_()  # cosine-like scores of a bf16 model
    labels = torch.tensor([0, 3, 6, 9])
    loss = info_nce(scores, labels, 0.05)
    reference = torch.nn.functional.cross_entropy(scores.detach().double() / 0.05, labels)  # the same rounded scores
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert scores.grad.dtype == torch.bfloat16 and torch.isfinite(scores.grad).all()


def test_bf16_finetuning_exports_the_fp32_master_weights(tmp_path, minilm_path):
    """As pre-training's export: a bf16 fine-tuning writes the fp32 masters of its last checkpoint, not the bf16
    working copy (which rounds every weight to 8 bits of mantissa)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    torch.manual_seed(0)
    model = tmp_path / "model"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=len(tokenizer), max_position_embeddings=64)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    beir = tiny_beir(tmp_path / "beir")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json", "--bf16", "true",
         "--model_name_or_path", str(model), "--data_dir", str(beir), "--output_dir", str(out),
         "--representation", "mean", "--train_group_size", "2", "--per_device_train_batch_size", "4",
         "--max_steps", "4", "--learning_rate", "1e-2", "--passage_max_length", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuning precision: bf16 (--bf16 true" in done.stderr
    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step-00000004")
    exported = load_file(out / "model" / "model.safetensors")
    name = "embeddings.word_embeddings.weight"
    master = next(v for k, v in masters.items() if k.endswith(name))
    weight = next(v for k, v in exported.items() if k.endswith(name))
    assert weight.dtype == torch.float32 and torch.equal(weight, master)
    assert not torch.equal(weight, weight.bfloat16().float())  # not the bf16 working copy
