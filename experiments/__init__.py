"""Experiments that answer "does this pre-training make a better retriever?": stages run as subprocesses and
reused when nothing upstream changed (`stages`), scoring shared by every table (`scoring`), the continued
pre-training of an existing encoder (`adaptation`), the ablation from random init (`ablation`), and their plots
(`curves`). `benchmarks/` and `demo/` are thin callers."""
