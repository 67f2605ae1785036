"""benchmarks/ablation.py end to end in its smoke mode (tiny model, tiny data, every stage), and the report's
arithmetic against a hand computation. The real experiment's numbers are in docs/results.md#ablation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.ablation import build_pairs, train_tokenizer
from experiments.ablation_report import report_lines, verdict

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "mlm", "retromae", "dupmae")
#: Loss terms each variant trains (the others must log exactly 0).
TERMS = {"mlm": {"mlm_loss"}, "retromae": {"mlm_loss", "decoder_loss"},
         "dupmae": {"mlm_loss", "decoder_loss", "bow_loss"}}
VARIANT_FLAGS = {"--decoder_weight", "--bow_weight", "--bow_include_masked"}


def _marker_command(folder: Path) -> list[str]:
    return json.loads((folder / ".stage.json").read_text())["command"]


def _without(command: list[str], valued: set[str], bare: set[str] = frozenset()) -> list[str]:
    """The command minus the named flags (with their values) and the bare ones."""
    kept, skip = [], False
    for token in command:
        if skip:
            skip = False
        elif token in valued:
            skip = True
        elif token not in bare:
            kept.append(token)
    return kept


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    command = [sys.executable, "benchmarks/ablation.py", "--smoke", "--output_dir", str(out),
               "--variants", ",".join(VARIANTS)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_smoke_run_prints_every_cell_and_writes_the_report(smoke_run):
    out, lines = smoke_run
    assert lines == [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cells = {(x["variant"], x["stage"], x["representation"]) for x in lines if x["metric"] == "nDCG@10"}
    for variant in VARIANTS:
        for stage in ("zero-shot", "fine-tuned"):
            assert {(variant, stage, "cls"), (variant, stage, "mean")} <= cells
            assert ((variant, stage, "dupmae") in cells) == (variant == "dupmae")
    assert {("bm25", "zero-shot", "bm25"), ("all-MiniLM-L6-v2", "zero-shot", "mean"),
            ("all-MiniLM-L6-v2+bm25", "zero-shot", "rrf")} <= cells
    for line in lines:
        assert {"bench", "variant", "dataset", "stage", "representation", "metric", "ours", "baseline", "ratio",
                "seeds", "spread"} <= set(line) and line["bench"] == "ablation"
    mlm_cls = next(x for x in lines if (x["variant"], x["stage"], x["representation"], x["metric"])
                   == ("mlm", "fine-tuned", "cls", "nDCG@10"))
    dupmae = next(x for x in lines if (x["variant"], x["stage"], x["representation"], x["metric"])
                  == ("dupmae", "fine-tuned", "dupmae", "nDCG@10"))
    assert dupmae["baseline"] == mlm_cls["ours"] and dupmae["baseline_cell"] == "mlm/cls"
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Verdict" in (out / "results.md").read_text()


@pytest.mark.slow
def test_each_variant_trains_exactly_its_own_terms(smoke_run):
    out, _ = smoke_run
    for variant, trained in TERMS.items():
        records = [json.loads(line) for line in (out / "seed-42" / variant / "pretrain" / "metrics.jsonl")
                   .read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        assert steps, variant
        for term in ("mlm_loss", "decoder_loss", "bow_loss"):
            values = [r[term] for r in steps]
            assert all(v > 0 for v in values) if term in trained else all(v == 0 for v in values), (variant, term)
    assert not (out / "seed-42" / "none" / "pretrain").exists()


@pytest.mark.slow
def test_variants_share_initial_weights_data_order_and_finetuning(smoke_run):
    out, _ = smoke_run
    seed = out / "seed-42"
    pretrain = {v: _marker_command(seed / v / "pretrain") for v in TERMS}
    init = {cmd[cmd.index("--model_name_or_path") + 1] for cmd in pretrain.values()}
    assert init == {str(seed / "init")}  # one random-init model per seed, every variant starts from it
    shared = {json.dumps(_without(cmd, {"--output_dir", "--decoder_weight", "--bow_weight"},
                                  {"--bow_include_masked"})) for cmd in pretrain.values()}
    assert len(shared) == 1  # same data, seed (data order, masks), steps, batch, length, lr, probe
    finetune = {v: _marker_command(seed / v / "finetune") for v in VARIANTS}
    assert finetune["none"][finetune["none"].index("--model_name_or_path") + 1] == str(seed / "init")
    assert len({json.dumps(_without(cmd, {"--output_dir", "--model_name_or_path"}))
                for cmd in finetune.values()}) == 1  # same pairs, negatives, steps, seed, representation


@pytest.mark.slow
def test_a_rerun_reuses_every_stage_and_reprints_the_same_lines(smoke_run):
    out, lines = smoke_run
    done = subprocess.run([sys.executable, "benchmarks/ablation.py", "--smoke", "--output_dir", str(out),
                           "--variants", ",".join(VARIANTS)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [json.loads(line) for line in done.stdout.splitlines()] == lines
    assert "running:" not in done.stderr  # every stage reused


def _cell(value):
    return {"nDCG@10": value, "Recall@100": value}


def test_report_means_spreads_baselines_and_average_by_hand():
    def seed(none, mlm, retro, dup, dup_sparse):
        return {"none": {"fine-tuned": {"cls": _cell(none)}}, "mlm": {"fine-tuned": {"cls": _cell(mlm)}},
                "retromae": {"fine-tuned": {"cls": _cell(retro)}},
                "dupmae": {"fine-tuned": {"cls": _cell(dup), "dupmae": _cell(dup_sparse)}}}

    results = {"a": [seed(0.10, 0.20, 0.30, 0.31, 0.40), seed(0.12, 0.22, 0.32, 0.33, 0.44)],
               "b": [seed(0.00, 0.10, 0.20, 0.21, 0.30), seed(0.02, 0.12, 0.22, 0.23, 0.34)]}
    lines = report_lines(results, {"a": {("bm25", "bm25"): _cell(0.5)}})

    def find(dataset, variant, rep):
        return next(x for x in lines if (x["dataset"], x["variant"], x["representation"], x["metric"])
                    == (dataset, variant, rep, "nDCG@10"))

    dup = find("a", "dupmae", "dupmae")
    assert dup["ours"] == 0.42 and dup["spread"] == 0.04 and dup["per_seed"] == [0.4, 0.44]
    assert dup["baseline"] == 0.21 and dup["ratio"] == round(0.42 / 0.21, 4)
    average = find("average", "retromae", "cls")  # seeds: (0.30 + 0.20) / 2 = 0.25, (0.32 + 0.22) / 2 = 0.27
    assert average["ours"] == 0.26 and average["spread"] == 0.02
    assert find("a", "bm25", "bm25")["baseline"] is None
    said = verdict(lines)
    assert "HOLDS" in said  # 0.37 > 0.26 > 0.16 > 0.06 on average, each gap above the 0.02-0.04 spreads
    flipped = {name: [{**s, "retromae": s["mlm"], "mlm": s["retromae"]} for s in per_seed]
               for name, per_seed in results.items()}
    assert "does NOT hold" in verdict(report_lines(flipped, {}))
    one_seed = {name: per_seed[:1] for name, per_seed in results.items()}
    assert "UNDECIDED (one seed" in verdict(report_lines(one_seed, {}))  # a spread of 0 measures no noise


def test_finetuning_pairs_prefix_ids_and_keep_every_training_pair(tmp_path):
    for name in ("x", "y"):
        folder = tmp_path / name
        (folder / "qrels").mkdir(parents=True)
        (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "t", "text": f"{name} doc"}) + "\n")
        (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": f"{name} query"}) + "\n")
        (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    build_pairs([tmp_path / "x", tmp_path / "y"], tmp_path / "pairs")
    assert (tmp_path / "pairs" / "qrels" / "train.tsv").read_text().splitlines() == [
        "query-id\tcorpus-id\tscore", "x/q1\tx/d1\t1", "y/q1\ty/d1\t1"]
    ids = [json.loads(line)["_id"] for line in (tmp_path / "pairs" / "corpus.jsonl").read_text().splitlines()]
    assert ids == ["x/d1", "y/d1"]


def test_the_trained_vocabulary_tokenizes_words_not_unknowns(tmp_path):
    """The first version saved a tokenizer whose vocabulary transformers 5 did not load: every token was [UNK]."""
    from common.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    text = "protein folding in the cell shapes every enzyme and every receptor of the cell membrane"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(20)))
    train_tokenizer(corpus, 200, tmp_path / "tokenizer")
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("protein folding shapes the cell")["input_ids"])
    assert tokens == ["[CLS]", "protein", "folding", "shapes", "the", "cell", "[SEP]"]
    assert tokenizer.unk_token == "[UNK]" and tokenizer.mask_token_id is not None and len(tokenizer) <= 200


def test_an_init_model_starts_every_variant_with_its_own_weights_tokenizer_and_config(tmp_path, monkeypatch):
    """--init_model: the checkpoint (weights, tokenizer, config) is every variant's start in every seed; no vocabulary
    is trained, no random-init model saved, and every stage that reads it names it in its command and inputs (so
    another checkpoint runs it again). The stages are planned by a recording run_stage, not run; the planned
    pre-training command is then parsed and its model built as pretrain/main.py builds it."""
    import experiments.ablation as ablation_module
    from benchmarks import smoke
    from common.tokenizer import load_tokenizer, vocab_hash
    from experiments.ablation import Ablation, AblationConfig
    from pretrain.arguments import parse_args
    from pretrain.modeling import DupMAEModel
    from transformers import BertForMaskedLM

    checkpoint = smoke.tiny_bert(tmp_path / "tiny-mlm").resolve()  # MiniLM's tokenizer, hidden 32, an MLM head
    planned = {}

    def plan(stage, log_dir) -> float:
        planned[stage.name] = stage
        return 0.0

    monkeypatch.setattr(ablation_module, "run_stage", plan)
    monkeypatch.setattr(ablation_module, "dupmae_representation", lambda model: None)
    monkeypatch.setattr(Ablation, "_evaluate", lambda *args: {})
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    cfg = AblationConfig(output_dir=str(out), init_model=str(checkpoint), variants=("none", "mlm", "dupmae"))
    Ablation(cfg, [smoke.tiny_beir(tmp_path / "tiny")], None).run()

    assert not (out / "tokenizer").exists() and not list(out.glob("seed-*/init"))
    preprocess = planned["preprocess"]
    assert preprocess.command[preprocess.command.index("--tokenizer") + 1] == str(checkpoint)
    assert checkpoint in preprocess.inputs
    pretrain = [planned[f"s{seed}-{v}-pretrain"] for seed in (42, 43) for v in ("mlm", "dupmae")]
    for stage in pretrain:
        assert stage.command[stage.command.index("--model_name_or_path") + 1] == str(checkpoint)
        assert not {"--model_config", "--config_overrides", "--tokenizer_name"} & set(stage.command)
        assert checkpoint in stage.inputs
    none = planned["s42-none-finetune"]
    assert none.command[none.command.index("--model_name_or_path") + 1] == str(checkpoint)

    args = parse_args(pretrain[0].command[2:])  # what pretrain/main.py loads from that command
    tokenizer = load_tokenizer(args.model.tokenizer_name or args.model.model_name_or_path)
    assert vocab_hash(tokenizer) == vocab_hash(load_tokenizer("default"))  # the checkpoint's own (MiniLM's)
    model = DupMAEModel.from_pretrained(args.model.model_name_or_path, args.loss)
    reference = BertForMaskedLM.from_pretrained(checkpoint).state_dict()
    assert model.mlm.config.hidden_size == 32 and not model.new_head  # its config and its head, not a new init
    for name, tensor in model.mlm.state_dict().items():
        if name in reference:
            assert torch.equal(tensor, reference[name]), name
    assert set(reference) <= set(model.mlm.state_dict())


def test_an_init_model_hub_name_is_its_snapshot_in_the_local_cache(tmp_path, monkeypatch):
    """Stages run offline: a hub name resolves to its cached snapshot folder (what commands carry and inputs
    fingerprint), an uncached one to an error that says how to get it; a folder stays that folder."""
    from huggingface_hub import constants

    from experiments.ablation import resolve_init_model

    snapshot = tmp_path / "hub" / "models--org--tiny-mlm" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_init_model("org/tiny-mlm") == snapshot
    with pytest.raises(ValueError, match="hf download org/absent"):
        resolve_init_model("org/absent")
    monkeypatch.chdir(tmp_path)
    assert resolve_init_model("hub") == tmp_path / "hub"
