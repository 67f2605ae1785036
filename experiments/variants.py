"""The pre-training variants every experiment compares, as flags of `pretrain/main.py` on one model class (RetroMAE
is DupMAE without the BoW term, plain MLM has no decoder either), so a variant differs only in its loss terms."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    pretrain_flags: tuple[str, ...] | None  # None: no pre-training (the starting model as it is)
    dupmae: bool  # trained the BoW head: the dupmae representation applies


VARIANTS = {
    "none": Variant(None, False),
    "mlm": Variant(("--decoder_weight", "0", "--bow_weight", "0"), False),
    "retromae": Variant(("--bow_weight", "0"), False),
    "dupmae": Variant((), True),
    "dupmae-official": Variant(("--objective", "official"), True),  # the official code's loss, BoW weight 0.1
}


def parse_variants(text: str) -> tuple[str, ...]:
    """`--variants a,b`: known names in the order given; a clear error for an unknown one."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"--variants: unknown {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return names
