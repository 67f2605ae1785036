"""The packaged all-MiniLM-L6-v2 reproduces its published SciFact score (MTEB: nDCG@10 0.64508).

The one test that encodes a real corpus (5,183 documents): minutes on 2 CPU cores; skipped without ../shared.
"""
from __future__ import annotations

import json

import pytest

from evaluation.beir import main


@pytest.mark.slow
@pytest.mark.shared
def test_scifact_minilm_mean_normalized_reproduces_mteb(scifact_dir, tmp_path):
    results = main(["--datasets", str(scifact_dir), "--output_dir", str(tmp_path), "--representation", "mean",
                    "--normalize", "true", "--split", "test", "--offline", "true"])
    scifact = results["scifact"]
    assert scifact["nDCG@10"] == pytest.approx(0.645, abs=0.005)
    assert 0 < scifact["MRR@10"] <= 1 and scifact["Recall@100"] > scifact["Recall@10"] > 0
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert len((tmp_path / "scifact.run").read_text().splitlines()) == 300 * 1000
