"""MLflow tracking: one run per benchmark, one parent run per Hydra multirun.

Everything goes through an explicit ``MlflowClient``: the fluent API (``mlflow.start_run``,
``mlflow.set_tracking_uri``) keeps a process-global active run and URI, which a sweep's jobs,
the sweep's parent run and the tests would all trample on.
"""

from __future__ import annotations

import atexit
import getpass
import logging
import posixpath
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from harness.measurement.environment import environment_tags

logger = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation). mlflow itself is imported lazily: it takes seconds,
# and Hydra instantiates the callback (importing this module) even for `--help` or tracking off.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
# Long enough for an exception message; a traceback belongs in an artifact, not a tag.
MAX_FAILURE_REASON_LENGTH = 2000

PARENT_RUN_ID_FILE = "mlflow_parent_run_id"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
ROLE_TAG = "layerbench.role"
FAILURE_REASON_TAG = "failure_reason"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# What MLflow accepts in a param/metric/tag key (validate_param_and_metric_name, POSIX).
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")

_T = TypeVar("_T")


def default_tracking_uri(outputs_dir: Path) -> str:
    """``sqlite:///<absolute outputs_dir>/mlflow.db`` (four slashes: SQLAlchemy's absolute form)."""
    return f"sqlite:///{(Path(outputs_dir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def flatten(obj: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists as dotted keys (``a.b.c``, list items ``a.0``), values as str.

    An empty mapping or list keeps its key (value ``{}``/``[]``) so that "set to nothing" stays
    visible instead of vanishing from the params.
    """
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for child_key, child in value.items():
                walk(child, f"{key}.{child_key}" if key else str(child_key))
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes) and value:
            for index, child in enumerate(value):
                walk(child, f"{key}.{index}" if key else str(index))
        elif isinstance(value, Mapping | Sequence) and not isinstance(value, str | bytes):
            flat[key] = "{}" if isinstance(value, Mapping) else "[]"
        else:
            flat[key] = str(value)

    if isinstance(obj, DictConfig):
        # Resolving here turns ${...} into values; MISSING (???) stays a readable string.
        obj = OmegaConf.to_container(obj, resolve=True, throw_on_missing=False)
    for key, value in obj.items():
        walk(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _clean_key(key: str) -> str:
    """A key MLflow accepts: a bad character or path-like form would reject the whole batch."""
    clean = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]
    if not clean or posixpath.normpath(clean) != clean or clean.startswith(("/", "..")) or clean == ".":
        clean = "_" + clean.replace("/", "_")
    return clean[:MAX_KEY_LENGTH]


def _truncate(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy: client.log_dict uses plain json.dump / yaml.safe_dump."""
    if isinstance(obj, DictConfig) or OmegaConf.is_list(obj):
        obj = OmegaConf.to_container(obj, resolve=True, throw_on_missing=False)
    if isinstance(obj, Mapping):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(value) for value in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:
            pass
    return str(obj)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """``<db dir>/mlartifacts/<experiment>`` as a file URI, for sqlite file stores.

    Without it a SQLite store puts artifacts under ``./mlruns`` of whatever directory the
    command happened to run in, and ``mlflow ui`` started elsewhere cannot show them.
    """
    db_path = sqlite_db_path(uri)
    if db_path is None:
        return None
    folder = re.sub(r"[^\w.-]", "_", experiment).strip(".") or "experiment"
    return (db_path.parent / "mlartifacts" / folder).as_uri()


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI that names a real file, else None."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


class RunTracker:
    """One MLflow run, logged through its own client so trackers never share hidden state."""

    def __init__(self, uri: str, experiment: str) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._ended = False
        db_path = sqlite_db_path(uri)
        if db_path is not None:
            # SQLite creates the file but not its directory.
            db_path.parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=_artifact_location(uri, experiment)
                )
            except MlflowException:
                # Another process (a parallel job) created it between our lookup and create.
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            self.experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                # A deleted experiment still owns its name and refuses new runs.
                logger.warning("MLflow experiment %r was deleted; restoring it", experiment)
                self.client.restore_experiment(found.experiment_id)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("RunTracker.start() has not been called")
        return self.run_id

    def start(
        self,
        *,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        if self.run_id is not None:
            raise RuntimeError(f"RunTracker already started run {self.run_id}; use one tracker per run")
        # Set at creation, not later: the UI nests and names the run from these right away.
        system_tags = {"mlflow.source.name": sys.argv[0] or "python", "mlflow.source.type": "LOCAL"}
        try:
            system_tags["mlflow.user"] = getpass.getuser()
        except Exception:  # no passwd entry for the uid in some containers
            pass
        if parent_run_id:
            system_tags[PARENT_RUN_ID_TAG] = parent_run_id
        git_commit = tags.get("git.commit")
        if git_commit:
            system_tags["mlflow.source.git.commit"] = git_commit
        run = self.client.create_run(self.experiment_id, tags=system_tags, run_name=run_name)
        self.run_id = run.info.run_id
        self._log_params(params)
        self.set_tags(tags)
        logger.info("MLflow run %r (%s) in %r at %s", run_name, self.run_id, self.experiment, self.uri)
        return self.run_id

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self._require_run()
        # A dict: cleaning can map two keys to one, and a batch with a duplicate key is rejected.
        cleaned = {_clean_key(key): _truncate(value, MAX_PARAM_VAL_LENGTH) for key, value in params.items()}
        entries = [Param(key, value) for key, value in cleaned.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        run_id = self._require_run()
        cleaned = {_clean_key(key): _truncate(value, MAX_TAG_VAL_LENGTH) for key, value in tags.items()}
        entries = [RunTag(key, value) for key, value in cleaned.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        run_id = self._require_run()
        timestamp = int(time.time() * 1000)
        # None means "does not apply": absent in MLflow, never a fake 0.
        entries = [
            Metric(_clean_key(key), float(value), timestamp, step)
            for key, value in metrics.items()
            if value is not None
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    def log_series(self, key: str, values: Sequence[float | None]) -> None:
        """One metric with step 0..n-1 (per-token latency etc.); a None leaves its step out."""
        from mlflow.entities import Metric

        run_id = self._require_run()
        timestamp = int(time.time() * 1000)
        name = _clean_key(key)
        entries = [
            Metric(name, float(value), timestamp, step)
            for step, value in enumerate(values)
            if value is not None
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON, or YAML when ``artifact_file`` ends in .yaml/.yml."""
        self.client.log_dict(self._require_run(), _plain(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self._require_run(), text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under ``artifact_path``."""
        run_id = self._require_run()
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Terminate the run; a second call is a no-op, so error paths can end unconditionally."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status={status!r} is not valid: choose one of {', '.join(TERMINAL_STATUSES)}")
        run_id = self._require_run()
        if self._ended:
            return
        if status != "FINISHED" and reason:
            self.set_tags({FAILURE_REASON_TAG: _truncate(reason, MAX_FAILURE_REASON_LENGTH)})
        self.client.set_terminated(run_id, status=status)
        self._ended = True


def _resolve_uri(config: DictConfig) -> str:
    uri = OmegaConf.select(config, "tracking.uri", default=None)
    if uri:
        return str(uri)
    outputs = OmegaConf.select(config, "paths.outputs", default="outputs")
    # Relative to where the command was started (hydra.runtime.cwd), not to a job's chdir.
    return default_tracking_uri(Path(to_absolute_path(str(outputs))))


def _sweep_dir(config: DictConfig) -> Path:
    return Path(to_absolute_path(str(config.hydra.sweep.dir)))


class MlflowSweepCallback(Callback):
    """Makes a Hydra multirun one parent MLflow run, with each job's run as its child.

    The parent run id reaches the jobs through a file in the sweep directory, which works for
    any launcher that shares the filesystem. Hydra's BasicSweeper re-raises a failed job's
    exception after its batch, so ``on_multirun_end`` never runs then: an atexit handler closes
    the parent on that path.
    """

    def __init__(self) -> None:
        self.tracker: RunTracker | None = None
        self.jobs = 0
        self.failed_jobs: list[str] = []
        self._lock = threading.Lock()
        self._closed = False

    def __getstate__(self) -> dict[str, Any]:
        # Launchers that run jobs in other processes (joblib, submitit) pickle the callbacks; a lock
        # cannot be pickled, and the parent run belongs to the process that started the sweep.
        state = self.__dict__.copy()
        state["_lock"] = None
        state["tracker"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config)
        id_file = sweep_dir / PARENT_RUN_ID_FILE
        # A reused sweep dir must not hand this sweep's jobs an older sweep's parent.
        id_file.unlink(missing_ok=True)
        if not OmegaConf.select(config, "tracking.enabled", default=True):
            return
        uri = _resolve_uri(config)
        experiment = str(OmegaConf.select(config, "tracking.experiment", default="layerbench"))
        outputs = OmegaConf.select(config, "paths.outputs", default=None)
        tags = environment_tags(Path(to_absolute_path(str(outputs))) if outputs else None)
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
        tags.update(
            {"hydra.sweep_dir": str(sweep_dir), "hydra.overrides": " ".join(overrides), ROLE_TAG: "parent"}
        )
        tracker = RunTracker(uri, experiment)
        tracker.start(run_name=f"sweep {sweep_dir.name}", params={}, tags=tags)
        self.tracker = tracker
        atexit.register(self._close_at_exit)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(f"{tracker.run_id}\n", encoding="utf-8")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        with self._lock:
            self.jobs += 1
            if job_return.status == JobStatus.FAILED:
                overrides = " ".join(job_return.overrides or []) or f"job {self.jobs - 1}"
                try:
                    _ = job_return.return_value  # re-raises the job's exception: the public way to get it
                    error = "unknown error"
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                self.failed_jobs.append(f"{overrides}: {error}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(finished_sweep=True)
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        try:
            self._close(finished_sweep=False)
        except Exception:  # at exit there is nobody left to handle it; say so and move on
            logger.exception("could not close the MLflow parent run of the sweep")

    def _close(self, *, finished_sweep: bool) -> None:
        with self._lock:
            if self.tracker is None or self._closed:
                return
            self._closed = True
            failed = len(self.failed_jobs)
            if failed:
                reason = f"{failed} of {self.jobs} jobs failed"
            elif not finished_sweep:
                # Interrupted, or the sweeper itself failed, before every job reported back.
                reason = f"sweep stopped after {self.jobs} jobs"
            else:
                reason = None
            summary = {"layerbench.jobs": str(self.jobs), "layerbench.jobs_failed": str(failed)}
            if failed:
                summary["layerbench.failed_jobs"] = "\n".join(self.failed_jobs)
            self.tracker.set_tags(summary)
            self.tracker.end("FAILED" if reason else "FINISHED", reason=reason)
            logger.info("MLflow parent run %s closed: %s", self.tracker.run_id, reason or "FINISHED")


def parent_run_id_for_job() -> str | None:
    """Inside a multirun job, the sweep's parent run id; None in RUN mode or outside Hydra."""
    if not HydraConfig.initialized():
        return None
    hydra_config = HydraConfig.get()
    if hydra_config.mode != RunMode.MULTIRUN:
        return None
    id_file = Path(to_absolute_path(str(hydra_config.sweep.dir))) / PARENT_RUN_ID_FILE
    try:
        run_id = id_file.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return run_id or None


__all__ = [
    "MlflowSweepCallback",
    "RunTracker",
    "default_tracking_uri",
    "flatten",
    "parent_run_id_for_job",
]
