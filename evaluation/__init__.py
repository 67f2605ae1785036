"""BEIR evaluation: encode (cached, sharded), search exactly (dense or DupMAE dense + sparse), score with pytrec_eval."""
