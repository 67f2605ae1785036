"""What both Beam jobs share around the pipeline: typed configs from the command line, runner defaults,
progress lines, and the end-of-run summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import re
import sys
import time
import typing
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions

from common.logging_setup import setup_logging
from common.tokenizer import TokenizerError

logger = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0


class PreflightError(ValueError):
    """Bad input paths or output folder, found before any work; reported as one line."""


def main_entry(run, argv: Sequence[str] | None) -> None:
    """A job's command line: logging, run(argv), and one-line errors (no traceback) for preflight failures."""
    setup_logging()
    quiet_beam_logging()
    try:
        run(argv)
    except (TokenizerError, PreflightError) as exc:
        sys.exit(f"error: {exc}")
    gc.freeze()  # the process exits next: spare the interpreter's final collections over torch's and Beam's heap


def parse_config(cls, argv: Sequence[str] | None, description: str):
    """A `cls` dataclass from --field flags (help = each field's metadata["help"]) plus the unknown args,
    which are Beam pipeline options (--runner, --project, --direct_num_workers, ...)."""
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, kwargs = hints[f.name], {"help": f.metadata.get("help", "")}
        if hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0])
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            kwargs["type"] = args[0] if args else hint
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    known, pipeline_args = parser.parse_known_args(argv)
    try:
        return cls(**vars(known)), pipeline_args
    except ValueError as exc:
        parser.error(str(exc))


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def make_pipeline(pipeline_args: Sequence[str], threads_per_worker: int) -> beam.Pipeline:
    """A pipeline with the user's Beam options. Without --runner (or with DirectRunner): the DirectRunner's
    engine in multi-processing mode with cores // threads_per_worker workers (each worker's tokenizer runs
    that many threads, so together they fill the cores once), unless --direct_running_mode /
    --direct_num_workers say otherwise."""
    args = list(pipeline_args)
    options = PipelineOptions(args)
    if options.view_as(StandardOptions).runner not in (None, "DirectRunner"):
        return beam.Pipeline(options=options)
    if not _given(args, "--direct_running_mode"):
        args += ["--direct_running_mode", "multi_processing"]
    if not _given(args, "--direct_num_workers"):
        args += ["--direct_num_workers", str(max(1, (os.cpu_count() or 1) // threads_per_worker))]
    options = PipelineOptions(args)
    return beam.Pipeline(runner=_local_runner(options), options=options)


LOCAL_RUNNERS = (None, "DirectRunner", "direct", "PrismRunner", "prism")  # workers share the launcher's disk


def check_paths_reach_workers(pipeline_args: Sequence[str], paths: Sequence[tuple[str, str]]) -> None:
    """Refuse, with one line, a local path when --runner sends the work to other machines: remote workers would
    read and write their own disks, and the launcher would not find the manifest. Their folders must be on a
    filesystem every worker reaches (gs://, s3://, hdfs://). A LOOPBACK environment runs the workers in the
    launcher, where local paths are fine."""
    options = PipelineOptions(list(pipeline_args))
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS or options.view_as(PortableOptions).environment_type == "LOOPBACK":
        return
    for flag, path in paths:  # (flag, path) pairs
        if path and FileSystems.get_scheme(path) in (None, "file"):
            raise PreflightError(
                f"--{flag} {path} is a local path, but --runner {runner} runs the job on other machines; "
                "use a gs://, s3:// or hdfs:// path every worker can reach"
            )


def setup_worker_process(threads: int, launcher_pid: int) -> None:
    """Once per Beam worker process (a DoFn's setup): `threads` Rust tokenizer threads (1: none), and the
    heap built so far (Beam, our modules, the tokenizer) moved out of the garbage collector's reach.

    make_pipeline runs cores // threads local workers, so tokenizer threads and Beam workers share the
    cores instead of both claiming all of them. Frozen objects are skipped by every later collection and by
    the interpreter's collections at exit, which otherwise walk that heap again when the worker stops.
    Only done in a separate worker process: an in-process run must not change its host's environment or
    garbage collector. The heap is frozen once per process (a long-lived remote worker sets up many DoFns; each
    freeze would keep that moment's garbage for good). RAYON_NUM_THREADS counts only before the process's
    first parallel encode starts Rust's thread pool: on a remote worker that another job's tokenizer already
    used, only TOKENIZERS_PARALLELISM (read on every call) takes effect (docs/preprocessing.md).
    """
    global _heap_frozen
    if os.getpid() != launcher_pid:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        if not _heap_frozen:
            gc.freeze()
            _heap_frozen = True


_heap_frozen = False  # setup_worker_process froze this process's heap already


class GatherAll(beam.PTransform):
    """Every element under one key: (None, [elements]), emitted even when the input is empty. Only for small
    collections (one descriptor per written part or shard): one worker holds them all."""


    def expand(self, pcoll):
        marker = pcoll.pipeline | "Marker" >> beam.Create([(None, None)])
        keyed = pcoll | "KeyNone" >> beam.Map(lambda x: (None, x))
        return (
            (marker, keyed)
            | "Flatten" >> beam.Flatten()
            | "Group" >> beam.GroupByKey()
            | "DropMarker" >> beam.MapTuple(lambda key, values: (key, [v for v in values if v is not None]))
        )


class Progress:
    """Logs documents/s and tokens/s of this worker at most every PROGRESS_SECONDS (local runs' progress)."""

    def __init__(self, what: str):
        self.what = what
        self.start = self.last = time.monotonic()
        self.documents = self.tokens = 0

    def add(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            elapsed = now - self.start
            logger.info(
                "%s (pid %d): %d documents (%.1f/s), %d tokens (%.0f/s)",
                self.what, os.getpid(), self.documents, self.documents / elapsed, self.tokens, self.tokens / elapsed,
            )


class _WorkerProgressOnly(logging.Filter):
    """Of the log lines multi-process workers forward to the runner, keep errors and our own lines, and
    shorten ours from the forwarded protobuf text to their message."""

    _MESSAGE = re.compile(r'message: "(.*?)" (?:instruction_id|transform_id|log_location)')

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "/preprocessing/" not in text:
            return record.levelno >= logging.ERROR
        match = self._MESSAGE.search(text)
        if match:
            record.msg, record.args = f"worker: {match.group(1)}", ()
        return True


def quiet_beam_logging() -> None:
    """Beam logs every worker's start-up and type-hint conversion at INFO; keep warnings and our progress."""
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    forwarded = logging.getLogger("apache_beam.runners.portability.local_job_service")
    forwarded.setLevel(logging.INFO)
    forwarded.addFilter(_WorkerProgressOnly())


def log_summary(what: str, counts: dict[str, int], seconds: float) -> None:
    logger.info(
        "%s done in %.1f s: %d documents (%.1f/s), %d tokens (%.0f/s), %d dead letters",
        what, seconds, counts["documents"], counts["documents"] / seconds, counts["tokens"],
        counts["tokens"] / seconds, counts["dead_letter"],
    )


def _local_runner(options: PipelineOptions):
    """The DirectRunner's FnApiRunner, built as the DirectRunner builds it. The DirectRunner itself first
    tries the Prism runner, which downloads a binary from GitHub: no use offline, and slow to fail."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    from preprocessing.beam_worker import QuietWorkersRunner

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return QuietWorkersRunner(provision_info=provision)  # Beam's FnApiRunner, its workers' notices filtered
