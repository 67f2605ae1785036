"""The demo's own parts: the offline docstring retrieval set, the stage runner, the report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from demo.docstring_corpus import build
from demo.__main__ import CONTROL, FROZEN, FUSED, HEAD, PACKAGED, TUNED_HEAD, artifacts, rows, verdict
from demo.report import results_table
from experiments.curves import plot_curves
from experiments.stages import Stage, StageFailed, run_stage


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def docstring_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("docstrings")
    return out, build(out)


def test_docstring_set_is_consistent_and_fair(docstring_set):
    out, counts = docstring_set
    corpus = {d["_id"]: d for d in _read_jsonl(out / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in _read_jsonl(out / "queries.jsonl")}
    assert counts["documents"] == len(corpus) == len(queries) > 1000
    labelled = 0
    for split in ("train", "test"):
        rows = (out / "qrels" / f"{split}.tsv").read_text().splitlines()
        assert rows[0] == "query-id\tcorpus-id\tscore"
        for row in rows[1:]:
            query_id, doc_id, score = row.split("\t")
            assert query_id in queries and doc_id in corpus and score == "1"
            # the query never appears inside its own document: retrieval must understand, not copy
            assert queries[query_id] not in corpus[doc_id]["text"]
            labelled += 1
    assert labelled == len(queries)
    assert counts["test_queries"] == len((out / "qrels" / "test.tsv").read_text().splitlines()) - 1
    assert 0.15 < counts["test_queries"] / len(queries) < 0.35


def test_docstring_set_is_deterministic(docstring_set, tmp_path):
    out, _ = docstring_set
    build(tmp_path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_stage_runs_once_then_is_reused(tmp_path):
    out = tmp_path / "stage"
    script = f"import pathlib; p = pathlib.Path({str(tmp_path / 'count')!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    stage = Stage("count", ["python", "-c", script], out)
    run_stage(stage, tmp_path / "logs")
    run_stage(stage, tmp_path / "logs")
    assert (tmp_path / "count").read_text() == "x"
    changed = Stage("count", ["python", "-c", script + " # changed"], out)
    run_stage(changed, tmp_path / "logs")
    assert (tmp_path / "count").read_text() == "xx"


def test_failed_stage_names_itself_and_its_log(tmp_path):
    stage = Stage("broken", [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], tmp_path / "o")
    with pytest.raises(StageFailed, match=r"stage 'broken' failed with exit code 3; read .*broken\.log"):
        run_stage(stage, tmp_path / "logs")
    assert "about to fail" in (tmp_path / "logs" / "broken.log").read_text()
    assert not (tmp_path / "o" / ".stage.json").exists()


def test_report_table_and_plot(tmp_path):
    scores = {"nDCG@10": 0.5, "MRR@10": 0.4, "Recall@100": 0.9}
    table = results_table({"zero-shot": scores}, {"evaluate": 12.4})
    assert "| zero-shot | 0.5000 | 0.4000 | 0.9000 |" in table and "| evaluate | 12 |" in table
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 3.0, "mlm_loss": 1.0, "decoder_loss": 1.5, "bow_loss": 0.5} for s in range(1, 6)]
    lines += [{"step": s, "eval/mean/nDCG@10": 0.5, "eval/dupmae/nDCG@10": 0.52} for s in (0, 5)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    png = tmp_path / "curves.png"
    plot_curves({"dupmae": metrics}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_compares_like_with_like_and_names_the_frozen_encoder():
    """Zero-shot rows against zero-shot ones (the BM25 fusion among them), fine-tuned against fine-tuned; the arm
    is called what it is (a BoW head on the frozen encoder); each row names the folder that reproduces it."""
    def metrics(value):
        return {"nDCG@10": value, "MRR@10": value, "Recall@100": value}

    results = {"none": {"zero-shot": {"mean": metrics(0.1), "cls": metrics(0.0)}, "fine-tuned": {"mean": metrics(0.5)}},
               "dupmae": {"zero-shot": {"mean": metrics(0.1), "dupmae": metrics(0.3)},
                          "fine-tuned": {"dupmae": metrics(0.4)}}}
    table = rows(results, metrics(0.35))
    assert [(name, v["nDCG@10"]) for name, v in table.items()] == [
        (PACKAGED, 0.1), (HEAD, 0.3), (FUSED, 0.35), (CONTROL, 0.5), (TUNED_HEAD, 0.4)]
    assert "frozen encoder" in HEAD and "control's encoder" in TUNED_HEAD
    said = verdict(table)
    assert said.startswith("zero-shot, the DupMAE BoW head is better than the packaged model alone by +0.2000 "
                           "nDCG@10; after the same fine-tuning, it is worse than the control by -0.1000 nDCG@10; "
                           "zero-shot, it is worse than the packaged model fused with BM25 (no training) by -0.0500 "
                           "nDCG@10. ")
    assert said.endswith(FROZEN) and "not DupMAE pre-training of the encoder" in said
    models = {("none", "zero-shot"): "default", ("none", "fine-tuned"): "n/ft", ("dupmae", "zero-shot"): "d/export",
              ("dupmae", "fine-tuned"): "d/finetune/dupmae"}
    named = artifacts(models)
    assert named[TUNED_HEAD] == "d/finetune/dupmae" and named[HEAD] == "d/export" and named[CONTROL] == "n/ft"
    assert "| fine-tuned (control) | 0.5000 | 0.5000 | 0.5000 | n/ft |" in results_table(table, {}, named)
    del results["none"]["fine-tuned"], results["dupmae"]["fine-tuned"]  # a dataset without train qrels
    assert list(rows(results)) == [PACKAGED, HEAD]
