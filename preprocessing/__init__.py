"""Beam jobs turning corpora into Arrow shards: pretrain_data (blocks with BoW targets) and finetune_data."""
