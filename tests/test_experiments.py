"""The experiment machinery reruns what changed and nothing else (issue 25 item 1), scores a variant with one
dupmae config at both stages (item 5), and fuses rankings by reciprocal rank exactly (issue 24 item 4)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from common.representation import RepresentationConfig, dupmae_config
from evaluation.fusion import reciprocal_rank_fusion
from experiments import adaptation
from experiments.stages import Stage, fingerprint, run_stage


def _append_stage(name: str, out: Path, text: str, inputs: tuple[Path, ...] = ()) -> Stage:
    """A stage that writes out/log.txt: its text plus whatever its input folder's log.txt holds."""
    source = f"{inputs[0]}/log.txt" if inputs else ""
    script = (f"import pathlib; p = pathlib.Path({str(out)!r}); p.mkdir(parents=True, exist_ok=True); "
              f"src = pathlib.Path({source!r}); up = src.read_text() if {bool(source)} else ''; "
              f"(p / 'log.txt').write_text(up + {text!r})")
    return Stage(name, [sys.executable, "-c", script], out, inputs=inputs)


def test_downstream_stage_reruns_when_its_upstream_reran_with_the_same_command(tmp_path):
    logs = tmp_path / "logs"
    run_stage(_append_stage("up", tmp_path / "up", "a"), logs)
    run_stage(_append_stage("down", tmp_path / "down", "b", (tmp_path / "up",)), logs)
    assert (tmp_path / "down" / "log.txt").read_text() == "ab"
    run_stage(_append_stage("down", tmp_path / "down", "b", (tmp_path / "up",)), logs)  # nothing changed: reused
    assert (tmp_path / "down" / "log.txt").read_text() == "ab"
    run_stage(_append_stage("up", tmp_path / "up", "A"), logs)  # other options upstream
    run_stage(_append_stage("down", tmp_path / "down", "b", (tmp_path / "up",)), logs)  # same command downstream
    assert (tmp_path / "down" / "log.txt").read_text() == "Ab"  # before the fix: "ab", a stale reuse


def test_fingerprint_follows_weights_not_paths(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    first = fingerprint(model)
    (model / "model.safetensors").write_bytes(b"\x01" * 64)  # same size, other weights
    assert fingerprint(model) != first
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "a"}\n')
    written = fingerprint(data)
    os.utime(data, ns=(1, 1))  # rewritten with the same text: the smoke data, a re-extracted corpus
    assert fingerprint(data) == written
    data.write_text('{"text": "b"}\n')
    assert fingerprint(data) != written
    (model / ".stage.json").write_text('{"run_id": "1"}')  # a stage output: its marker identifies it
    marked = fingerprint(model)
    (model / ".stage.json").write_text('{"run_id": "2"}')
    assert fingerprint(model) != marked


def test_evaluation_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(adaptation, "evaluate_model",
                        lambda model, *args: calls.append(model) or {"mean": {"nDCG@10": 0.5}})
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00" * 8)
    cfg = adaptation.AdaptationConfig(output_dir=str(tmp_path / "out"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("{}\n")
    experiment = adaptation.Experiment(cfg, data, 42, tmp_path, None)
    result = tmp_path / "out" / "scores.json"
    experiment._evaluate("zero-shot", str(model), None, result)
    experiment._evaluate("zero-shot", str(model), None, result)
    assert len(calls) == 1  # cached
    (model / "model.safetensors").write_bytes(b"\x02" * 8)  # trained again, same path
    experiment._evaluate("zero-shot", str(model), None, result)
    assert len(calls) == 2  # before the fix: the stale cached scores


def test_dupmae_variant_is_scored_with_one_config_at_both_stages(tmp_path, monkeypatch):
    """A plain BERT base: the export records the paper's dupmae config; the fine-tuned folder records `mean`. Both
    rows must use the export's config (before the fix, the fine-tuned row rebuilt a mean-based one)."""
    paper = dupmae_config(None, 32)
    export, tuned = tmp_path / "pretrain" / "export", tmp_path / "finetune" / "model"
    for folder, config in ((export, paper), (tuned, RepresentationConfig(kind="mean", normalize=True))):
        folder.mkdir(parents=True)
        (folder / "representation.json").write_text(json.dumps(config.__dict__))
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    seen = {}
    monkeypatch.setattr(adaptation, "evaluate_model",
                        lambda model, dataset, length, docs, dupmae: seen.setdefault(model, dupmae) and {})
    cfg = adaptation.AdaptationConfig(output_dir=str(tmp_path / "out"))
    experiment = adaptation.Experiment(cfg, tmp_path, 42, tmp_path, tmp_path / "negatives.jsonl")
    monkeypatch.setattr(experiment, "_pretrain", lambda *args: tmp_path / "pretrain")
    monkeypatch.setattr(experiment, "_finetune", lambda *args: tmp_path / "finetune")
    joined = experiment.out / "dupmae" / "finetune" / "dupmae"  # the tuned encoder + the export's sparse half
    calls = []

    def with_sparse_half(*args):
        calls.append(args)
        return str(args[-1])

    monkeypatch.setattr(adaptation, "with_sparse_half", with_sparse_half)
    experiment.run("dupmae")
    assert calls == [(str(tuned), paper, str(export), joined)]
    assert seen == {str(export): paper, str(joined): paper}
    assert experiment.models["dupmae", "fine-tuned"] == str(joined)


def test_reciprocal_rank_fusion_by_hand():
    dense = {"q": {"a": 0.9, "b": 0.8, "c": 0.1}}
    bm25 = {"q": {"c": 12.0, "a": 11.0, "d": 1.0}}
    fused = reciprocal_rank_fusion([dense, bm25], k=60)["q"]
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63})
    assert list(reciprocal_rank_fusion([dense, bm25], k=60, depth=2)["q"]) == ["a", "c"]
    with pytest.raises(ValueError, match="k must be >= 0"):
        reciprocal_rank_fusion([dense], k=-1)
