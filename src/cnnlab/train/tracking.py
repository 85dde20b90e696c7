"""Optional experiment tracking with MLflow (the ``mlflow`` setting; the extra ``cnnlab[mlflow]``).

A run logs to one MLflow run: its configuration as parameters when it starts, each epoch's record of
metrics.jsonl as metrics at step = epoch once that epoch's checkpoint is written, its checkpoints
(last.pt, and best.pt when there is one) when it ends, and its report when one is written. The MLflow
run's id is kept in ``RUN_DIR/mlflow.json``, so that a resumed run goes on logging to the same MLflow run.

``mlflow`` true logs to a local store in the run folder, ``RUN_DIR/mlflow/`` (an SQLite database, which
MLflow 3 makes its default, and the artifacts beside it); a text is a tracking URI as MLflow takes it. A
group of seeds keeps one store in the group folder, with one parent MLflow run and each seed's run
nested under it. MLflow is imported only when tracking is on: it takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnlab.core.errors import Interrupted, UserError, one_line
from cnnlab.core.files import atomic_write
from cnnlab.train.logging import read_metrics

log = logging.getLogger(__name__)

ID_FILE = "mlflow.json"  # in a run (or group) folder: the MLflow run it logs to
STORE = "mlflow"  # the local store's folder, in the run (or group) folder
DATABASE = "mlflow.db"
EXPERIMENT = "cnnlab"  # unless MLflow's own MLFLOW_EXPERIMENT_NAME says otherwise
INSTALL = "pip install 'cnnlab[mlflow]'"
NOT_METRICS = ("kind", "epoch")  # an epoch record's keys that are not figures: the epoch is the metric's step


@dataclass
class Record:
    """What ``mlflow.json`` holds: the MLflow run and where its store is."""

    run_id: str
    experiment_id: str
    tracking_uri: str | None = None  # as `mlflow` gave it; None: the local store
    store: str | None = None  # the local store's folder, relative to the folder that holds this record
    parent_run_id: str | None = None  # the group's run, for a run of a group of seeds


def require(setting: bool | str) -> None:
    """Refuse at once, before anything is trained, when MLflow (or, for the local store, its database
    layer) is not installed."""
    _client_class()
    if setting is True:
        try:
            import alembic  # noqa: F401 (imported to check that it is installed: the SQLite store needs it)
            import sqlalchemy  # noqa: F401 (the same)
        except ImportError as e:
            raise UserError(f"`mlflow`'s store in the run folder needs {e.name}, which is not installed; "
                            f"install it with: {INSTALL}") from None


def _client_class() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(f"`mlflow` logs to MLflow, which is not installed; install it with: {INSTALL}") from None
    return MlflowClient


def read_record(folder: Path) -> Record | None:
    """The MLflow run that ``folder`` (a run or a group) logs to, or None when it logs to none."""
    try:
        return Record(**json.loads((folder / ID_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def describe(folder: Path) -> str | None:
    """How to see what ``folder`` logged to MLflow, for the terminal; None when it logged nothing."""
    record = read_record(folder)
    if record is None:
        return None
    if record.store is not None:
        return f"mlflow ui --backend-store-uri sqlite:///{Path(os.path.normpath(folder / record.store)) / DATABASE}"
    return f"run {record.run_id} at {record.tracking_uri}"


@contextmanager
def _calling(uri: str) -> Iterator[None]:
    """MLflow's failures (a server out of reach, a URI it cannot use) as one line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"MLflow at {uri}: {first}; check `mlflow` (a tracking URI MLflow can reach, or `mlflow` "
                        "alone for the store in the run folder)") from None


class Tracker:
    """The MLflow run of one training run or group, as a context manager that ends it: FINISHED once
    :meth:`finish` was called, KILLED when stopped to be resumed, FAILED on an error."""

    def __init__(self, folder: Path, record: Record) -> None:
        self.folder, self.record, self.finished = folder, record, False
        self.uri = record.tracking_uri or _local_uri(folder / (record.store or STORE))
        self.client = _client_class()(tracking_uri=self.uri)

    @classmethod
    def start(cls, setting: bool | str, folder: Path, params: dict[str, Any], parent: Tracker | None = None,
              resume: bool = False) -> Tracker:
        """Continue the MLflow run ``folder`` recorded (``resume``), or start one: in the store ``setting``
        names, or nested under ``parent`` in its store. A new run gets ``params``."""
        record = read_record(folder) if resume else None
        if record is not None:
            tracker = cls(folder, record)
            with _calling(tracker.uri):
                tracker.client.update_run(record.run_id, status="RUNNING")
            return tracker
        if parent is not None:
            store = None if parent.record.store is None else os.path.relpath(parent.store_folder, folder)
            record = Record("", parent.record.experiment_id, parent.record.tracking_uri, store,
                            parent.record.run_id)
        else:
            record = Record("", "", None if setting is True else str(setting), STORE if setting is True else None)
        tracker = cls(folder, record)
        tracker._create(params)
        return tracker

    @property
    def store_folder(self) -> Path:
        return self.folder / (self.record.store or STORE)

    def _create(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {"cnnlab.folder": str(self.folder.resolve())}
        if self.record.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.record.parent_run_id
        with _calling(self.uri):
            if not self.record.experiment_id:
                self.record.experiment_id = self._experiment()
            run = self.client.create_run(self.record.experiment_id, run_name=self.folder.name, tags=tags)
            self.record.run_id = run.info.run_id
            atomic_write(self.folder / ID_FILE, json.dumps(asdict(self.record), indent=2))
            self.client.log_batch(self.record.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def _experiment(self) -> str:
        """The id of the experiment runs go to (created on first use; the local store's keeps its
        artifacts beside its database)."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is None:
            artifacts = (self.store_folder / "artifacts").resolve().as_uri() if self.record.store else None
            return self.client.create_experiment(name, artifact_location=artifacts)
        if found.lifecycle_stage != "active":
            raise UserError(f"the MLflow experiment {name!r} at {self.uri} was deleted; restore it, or name "
                            "another with the environment variable MLFLOW_EXPERIMENT_NAME")
        return found.experiment_id

    def metrics(self, values: dict[str, Any], step: int) -> None:
        """The numbers among ``values`` (not ``NOT_METRICS``) as metrics at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        with _calling(self.uri):
            self.client.log_batch(self.record.run_id, metrics=batch)

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record of metrics.jsonl, at step = its epoch."""
        self.metrics(record, int(record["epoch"]))

    def catch_up(self, run_dir: Path) -> None:
        """Log the epochs metrics.jsonl holds and MLflow lacks: a run stopped between writing an epoch's
        checkpoint and logging it."""
        try:
            _, epochs, _ = read_metrics(run_dir)
        except UserError:
            return  # no epoch finished yet
        with _calling(self.uri):
            logged = {m.step for m in self.client.get_metric_history(self.record.run_id, "train_loss")}
        for r in epochs:
            if r["epoch"] not in logged:
                self.epoch(r)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        with _calling(self.uri):
            self.client.log_artifact(self.record.run_id, str(path), folder)

    def finish(self, stopped: str, files: list[Path] | None = None) -> None:
        """The run ended (``stopped`` says why): log ``files`` into ``checkpoints/``; FINISHED on leaving."""
        for path in files or []:
            if path.is_file():
                self.artifact(path, "checkpoints")
        with _calling(self.uri):
            self.client.set_tag(self.record.run_id, "cnnlab.stopped", stopped)
        self.finished = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if kind is None:
            status = "FINISHED" if self.finished else "KILLED"  # stopped as asked, to be resumed
        else:
            status = "KILLED" if issubclass(kind, (Interrupted, KeyboardInterrupt)) else "FAILED"
        try:
            with _calling(self.uri):
                self.client.set_terminated(self.record.run_id, status)
        except UserError as e:
            if kind is None:
                raise
            log.warning(one_line(f"the MLflow run is not marked {status}: {e}"))  # the error that ended it wins


def _local_uri(store: Path) -> str:
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store.resolve() / DATABASE}"


def log_report(run_dir: Path, page: Path) -> None:
    """Log the report ``page`` of ``run_dir`` (a run or a group) to its MLflow run, when it has one.

    The report is written by then: an MLflow that cannot take it is a warning, not an error.
    """
    record = read_record(run_dir)
    if record is None:
        return
    try:
        Tracker(run_dir, record).artifact(page)
    except UserError as e:
        log.warning(one_line(f"{page} is not logged to MLflow: {e}"))
