"""Loading HF weights with one report in our words instead of transformers' load table.

transformers 5 logs a WARNING table ("... LOAD REPORT") for every key it did not find or did not use, and a
"checkpoint seem corrupted" line for a missing tied MLM-head bias, on the cases this program expects: a checkpoint
without an MLM head (the packaged MiniLM) read as a masked LM, or a masked LM's checkpoint read by a bare encoder.
Warnings that fire on every normal run teach users to skip warnings, so during the load those two notices are held
back; what is missing is then said here: encoder weights that the checkpoint lacks are a WARNING (they start at
random), an absent pooler or MLM head and unused checkpoint tensors are INFO. If the load fails (a size mismatch,
a conversion error: transformers raises "look at the above report"), the held-back report is logged before the
error goes on.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)

#: the notices held back during a load: transformers' key table, and its line on a missing tied head bias
_HELD_BACK = ("LOAD REPORT", "This checkpoint seem corrupted")
_SHOWN = 8  # key names listed in one of our lines; the rest are counted


class _HoldBack(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if any(notice in str(record.msg) for notice in _HELD_BACK):
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _load_report_held_back() -> Iterator[None]:
    source = logging.getLogger("transformers.modeling_utils")
    hold = _HoldBack()
    source.addFilter(hold)
    try:
        yield
    except BaseException:
        source.removeFilter(hold)
        for record in hold.held:  # the report the error message points at
            source.handle(record)
        raise
    source.removeFilter(hold)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_pretrained(auto_class, path: str, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)` with our report; returns (model, the head keys it initialized).

    A head key is a missing key outside the base model (an MLM head); a bare encoder (AutoModel) has none.
    """
    with _load_report_held_back():
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    prefix = "" if model.base_model is model else model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    head = [key for key in missing if not key.startswith(prefix)]
    base = [key for key in missing if key.startswith(prefix)]
    pooler = [key for key in base if key.startswith(prefix + "pooler.")]
    encoder = [key for key in base if key not in pooler]
    if encoder:
        logger.warning("%s lacks %d encoder tensors, initialized at random: %s", path, len(encoder), _listed(encoder))
    if pooler:
        logger.info("%s has no pooler (unused here): initialized %d tensors", path, len(pooler))
    unexpected = sorted(info["unexpected_keys"])
    if unexpected:
        logger.info("%s: %d checkpoint tensors unused by %s (%s)", path, len(unexpected), type(model).__name__,
                    _listed(unexpected))
    return model, head
