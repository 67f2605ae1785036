"""Dataclass fields for the stages' command lines, parsed by `transformers.HfArgumentParser`."""
from __future__ import annotations

from dataclasses import field


def optional_bool(help: str):
    """A `bool | None` option (None: decided elsewhere, e.g. by the model folder) that parses like the plain `bool`
    flags: `--flag` alone is True, `--flag false` / `--flag true` as given, no flag None.

    HfArgumentParser makes the value optional (nargs="?", const=True) only for a bool whose default is not None,
    so without this a bare `--flag` fails with "expected one argument"."""
    return field(default=None, metadata={"help": help, "nargs": "?", "const": True})
