"""DupMAE / RetroMAE pre-training: model, collator, data, training loop (see ../shared/DUPMAE.md)."""
