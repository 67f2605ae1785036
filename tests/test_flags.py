"""Command-line flags shared by the stages: `--normalize` parses like every other boolean flag (issue 25)."""
from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from evaluation.config import EvalConfig
from finetune.config import FinetuneConfig
from finetune.mine_negatives import MiningConfig

#: Each stage's config with the flags it requires.
STAGES = {
    "finetune": (FinetuneConfig, ["--data_dir", "d", "--output_dir", "o", "--deepspeed", "ds.json"]),
    "evaluation": (EvalConfig, ["--datasets", "scifact", "--output_dir", "o"]),
    "mining": (MiningConfig, ["--data_dir", "d", "--out", "negs.jsonl"]),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("flags,expected", [([], None), (["--normalize"], True), (["--normalize", "true"], True),
                                            (["--normalize", "false"], False), (["--normalize", "False"], False)])
def test_normalize_is_a_bool_flag_with_a_bare_form(stage, flags, expected):
    config, required = STAGES[stage]
    # bare flag last and in the middle: a following option must not be taken as its value
    for argv in ([*required, *flags], [*flags, *required]):
        (cfg,) = HfArgumentParser(config).parse_args_into_dataclasses(argv)
        assert cfg.normalize is expected, argv
