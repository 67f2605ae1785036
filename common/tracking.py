"""`--report_to`: the experiment trackers a training run reports to (TensorBoard, Weights & Biases, MLflow).

HF TrainingArguments' flag and meaning: `tensorboard` (the default here), `wandb`, `mlflow`, several at once,
`all` (every one installed) or `none`. Rank 0 reports, at each logging step, the numbers of the metrics.jsonl
line under the same names with its `step` (W&B: `step` is the x axis of every chart; MLflow: the step of each
metric, and a character MLflow refuses in a name, such as the `@` of `nDCG@10`, becomes `_`). TensorBoard keeps
its `train/` prefix on names without a `/`.

A resumed run continues the same tracker runs: the W&B run id and the MLflow run id travel in the checkpoint
(`ids()` into the train state, back through `start(ids=...)`). A tracker named but not installed is a one-line
error when the options are parsed (`resolve_report_to`); one that cannot start (W&B init, an MLflow server) is a
one-line error on every rank before the first step (`start`). A tracker that fails later logs one warning and is
dropped: a run never stops for its tracker. Each tracker run gets the run's provenance (common/provenance.py):
W&B as its config, MLflow as params (the options) plus the whole dict as the artifact provenance/step-N.json.

Settings from the environment, as with HF: WANDB_PROJECT (default "dupmae"), WANDB_MODE (e.g. offline),
WANDB_DIR (default: the output folder); MLFLOW_TRACKING_URI (default: MLflow's own), MLFLOW_EXPERIMENT_NAME
(default "dupmae").
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
import uuid
from dataclasses import field
from pathlib import Path

import torch.distributed as dist

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
_MLFLOW_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")
_MLFLOW_BATCH = 100  # MLflow's most params per log_batch


class TrackerError(ValueError):
    """A tracker named in --report_to that is not installed or cannot start: one line, before any step."""


def report_to_field(where: str):
    """The `--report_to` dataclass field (normalize with `resolve_report_to` in __post_init__)."""
    return field(default_factory=lambda: ["tensorboard"], metadata={
        "nargs": "+", "help": f"trackers of the metrics.jsonl scalars at each logging step: tensorboard ({where}), "
                              "wandb, mlflow (pip install -e '.[wandb]' / '.[mlflow]'), several, all (every one "
                              "installed) or none; each tracker run also gets the run's provenance, written to "
                              "OUT/provenance/step-N.json (resolved options, DeepSpeed JSON, git commit and dirty "
                              "flag, package versions, hardware, data hash): W&B as its config, MLflow as params and "
                              "the artifact provenance/step-N.json. W&B/MLflow settings: WANDB_PROJECT, WANDB_MODE, "
                              "MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME"})


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_report_to(value) -> list[str]:
    """The trackers a --report_to value names, in TRACKERS order; raises TrackerError (one line) for an unknown
    name or a tracker that is not installed. A YAML/JSON config may give one string."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if installed(name)]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise TrackerError(f"--report_to {' '.join(names)}: unknown {', '.join(unknown)}; choose from "
                           f"{', '.join(TRACKERS)}, or all, or none")
    missing = [name for name in TRACKERS if name in names and not installed(name)]
    if missing:
        extras = " ".join(f"'.[{name}]'" for name in missing)
        raise TrackerError(f"--report_to {' '.join(missing)}: not installed; pip install -e {extras} "
                           f"(or pip install {' '.join(missing)})")
    return [name for name in TRACKERS if name in names]


class Tracking:
    """Rank 0's tracker runs behind one `log(record)`; on other ranks (and for `none`) it does nothing."""

    def __init__(self, trackers: dict):
        self.trackers = trackers  # name -> _Tracker

    @classmethod
    def start(cls, names: list[str], *, rank: int, output_dir: str | Path, tensorboard_dir: str | Path,
              run_name: str | None, resume_step: int, ids: dict | None, provenance: dict) -> "Tracking":
        """Start (or continue, with the ids from a checkpoint) rank 0's tracker runs. Every rank calls this: a
        tracker that cannot start raises the same TrackerError on every rank."""
        trackers, error = {}, None
        if rank == 0:
            run_name = run_name or Path(output_dir).resolve().name
            for name in names:
                try:
                    trackers[name] = _STARTERS[name](output_dir=Path(output_dir), tensorboard_dir=tensorboard_dir,
                                                     run_name=run_name, resume_step=resume_step,
                                                     run_id=(ids or {}).get(name), provenance=provenance)
                except Exception as exc:  # any failure of a tracker's own start-up (network, auth, a bad URI)
                    error = f"--report_to {name}: could not start: {_first_line(exc)}"
                    break
            if error:
                for tracker in trackers.values():
                    tracker.close()
        if dist.is_initialized() and dist.get_world_size() > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error:
            raise TrackerError(error)
        for tracker in trackers.values():
            logger.info("%s", tracker.describe())
        return cls(trackers)

    def log(self, record: dict) -> None:
        """Report a metrics.jsonl record's numbers (bools and None left out) at its step."""
        scalars = {key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(record["step"], scalars)
            except Exception as exc:  # a tracker's failure mid-run never stops the run
                logger.warning("--report_to %s: logging step %d failed (%s); no more %s reports in this run", name,
                               record["step"], _first_line(exc), name)
                self.trackers.pop(name)

    def ids(self) -> dict:
        """The tracker run ids a checkpoint keeps, so that a resume continues the same runs."""
        return {name: tracker.run_id for name, tracker in self.trackers.items() if tracker.run_id is not None}

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for a nested dict (MLflow params are flat)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _TensorBoard:
    run_id = None

    def __init__(self, *, tensorboard_dir, resume_step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)
        self.path = tensorboard_dir

    def describe(self) -> str:
        return f"reporting to TensorBoard in {self.path}"

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, *, output_dir: Path, run_name: str, run_id: str | None, provenance: dict, **_):
        import wandb

        self.resumed = run_id is not None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dupmae"), name=run_name,
                              id=run_id or uuid.uuid4().hex[:12], resume="allow",
                              dir=os.environ.get("WANDB_DIR", str(output_dir)))
        self.run.config.update(provenance, allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step", step_sync=True)
        self.run_id = self.run.id

    def describe(self) -> str:
        how = "continuing" if self.resumed else "started"
        return f"reporting to W&B: {how} run {self.run_id} ({self.run.settings.mode}, {self.run.dir})"

    def log(self, step: int, scalars: dict) -> None:
        self.run.log({"step": step, **scalars})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, *, run_name: str, run_id: str | None, resume_step: int, provenance: dict, **_):
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.resumed = run_id is not None
        if self.resumed:
            self.client.get_run(run_id)  # raises when the run is not in this tracking store
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dupmae")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
            params = [Param(key, str(value)) for key, value in _flat(provenance["config"]).items()]
            for start in range(0, len(params), _MLFLOW_BATCH):  # params are fixed once logged: the first start's
                self.client.log_batch(run_id, params=params[start:start + _MLFLOW_BATCH])
        self.client.log_dict(run_id, provenance, f"provenance/step-{resume_step}.json")
        self.run_id = run_id

    def describe(self) -> str:
        how = "continuing" if self.resumed else "started"
        return f"reporting to MLflow: {how} run {self.run_id} ({self.client.tracking_uri})"

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_MLFLOW_NAME.sub("_", key), float(value), now, step)
                                                    for key, value in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_STARTERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
