"""Library notices a user of this program cannot act on, dropped where they are logged.

Each is one (logger, message start) pair, filtered on that logger in this program's processes only (never a level
change, never the warnings module): the same libraries' other warnings still show. What each one means:
- Beam, on import without its GCP extras: "apitools not found, and bigquery client libraries are not available";
  the jobs here read and write files, never BigQuery (a gs:// path without the extras fails on its own, loudly).
- Beam's local workers (`preprocessing.beam_worker` installs the filters there): "Discarding unparseable args" lists
  two of Beam's own DirectRunner options that the worker's parser does not know; "No semi_persistent_directory
  found" says a local worker has no staging folder, which only Dataflow's workers have.
- DeepSpeed's WarmupLR / WarmupDecayLR: "Attempting to get learning rate from scheduler before it has started" is
  logged by the scheduler's own constructor, before any step, on every run (fine-tuning's DeepSpeed JSONs).
"""
from __future__ import annotations

import logging

NOTICES = (
    ("root", "apitools not found, and bigquery client libraries are not available"),
    ("apache_beam.options.pipeline_options", "Discarding unparseable args"),
    ("apache_beam.runners.worker.sdk_worker_main", "No semi_persistent_directory found"),
    ("DeepSpeed", "Attempting to get learning rate from scheduler before it has started"),
)


class _DropNotice(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_known_notices() -> None:
    """Install the filters (once per logger; a logger's filters outlive basicConfig(force=True) and a library's
    own handler set-up, so this may run before the library is imported)."""
    for name, start in NOTICES:
        target = logging.getLogger(None if name == "root" else name)
        if not any(isinstance(f, _DropNotice) and f.start == start for f in target.filters):
            target.addFilter(_DropNotice(start))
