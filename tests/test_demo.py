"""The demo's own parts: the offline docstring retrieval set, the stage runner, the report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from demo.docstring_corpus import build
from demo.report import dataset_scores, plot_pretrain_losses, results_table
from demo.stages import Stage, StageFailed, run_stage


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
    assert not (tmp_path / "o" / ".demo_stage.json").exists()


def test_report_table_and_plot(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"docstrings": {"nDCG@10": 0.5, "MRR@10": 0.4, "Recall@100": 0.9}}))
    table = results_table({"zero-shot": dataset_scores(results)}, {"evaluate": 12.4})
    assert "| zero-shot | 0.5000 | 0.4000 | 0.9000 |" in table and "| evaluate | 12 |" in table
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0, "mlm_loss": 1.0, "decoder_loss": 1.5,
                                           "bow_loss": 0.5}) + "\n" for s in range(1, 6)))
    png = tmp_path / "losses.png"
    plot_pretrain_losses(metrics, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
