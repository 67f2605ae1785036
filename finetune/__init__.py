"""Contrastive fine-tuning of a (DupMAE) encoder into a retriever: InfoNCE over in-batch, hard and cross-device negatives."""
