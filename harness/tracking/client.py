"""One MLflow run through its own ``MlflowClient``, and where the runs are stored.

Everything goes through an explicit client: the fluent API (``mlflow.start_run``,
``mlflow.set_tracking_uri``) keeps a process-global active run and URI, which a sweep's jobs,
the sweep's parent run and the tests would all trample on.

mlflow itself is imported inside the functions that need it: it takes seconds, and Hydra
instantiates the sweep callback (importing this module) even for ``--help`` or tracking off.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.files import exclusive_lock
from harness.tracking.orphans import close_orphans
from harness.tracking.record import PermanentStoreError, one_line, plain

logger = logging.getLogger(__name__)

# mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID, spelled out so that importing this module stays light.
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
ROLE_TAG = "layerbench.role"
# MLflow 3's UI opens an experiment in its GenAI view (traces) unless told it holds training-style runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
FAILURE_REASON_TAG = "failure_reason"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Long enough for an exception message; a traceback belongs in an artifact, not a tag.
MAX_FAILURE_REASON_LENGTH = 2000

# The characters mlflow.utils.validation.validate_param_and_metric_name accepts (POSIX).
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def default_tracking_uri(outputs_dir: Path) -> str:
    """``sqlite:///<absolute outputs_dir>/mlflow.db`` (four slashes: SQLAlchemy's absolute form)."""
    return f"sqlite:///{(Path(outputs_dir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI that names a real file, else None."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


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


def config_params(resolved: Mapping[str, Any], choices: Mapping[str, str]) -> dict[str, str]:
    """A config as MLflow params: flattened, with each config group's choice once, as the param named
    after the group (`<group>.name` would repeat it; `<group>._target_` is an implementation detail)."""
    repeats = {f"{group}.name" for group in choices}
    flat = {k: v for k, v in flatten(resolved).items() if k not in repeats and not k.endswith("._target_")}
    return {**flat, **choices}


def _clean_key(key: str) -> str:
    """A key MLflow accepts: MLflow validates keys but has no cleaner, and one bad key rejects the whole batch."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, path_not_unique

    clean = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_ENTITY_KEY_LENGTH]
    if not clean or path_not_unique(clean):
        clean = "_" + clean.replace("/", "_")
    return clean[:MAX_ENTITY_KEY_LENGTH]


class TrackingServerUnreachable(RuntimeError):
    pass


# Long enough for a server on another machine; MLflow's own client retries for about four minutes instead.
SERVER_CHECK_TIMEOUT_S = 5.0


def check_server(uri: str) -> None:
    """An http(s) tracking URI must answer MLflow's /health now: fail in seconds, before any heavy work."""
    if not uri.startswith(("http://", "https://")):
        return
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_CHECK_TIMEOUT_S) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingServerUnreachable(
        f"the MLflow tracking server at {uri} does not answer ({reason}): start it (README, \"Running on several "
        "machines\") or point tracking.uri at a running one"
    )


def _opened(open_store: Callable[[], Any], *, db_path: Path | None, attempts: int = 5) -> Any:
    """`open_store()`, which opens the store and on a new SQLite store creates its tables.

    Our processes take turns through the lock beside the database, but another program (`mlflow ui`, a
    notebook's client) can be creating the same new store's tables at the same moment: then the loser's
    migration fails ("table ... already exists", "Online migration expected to match one row"), or reads a
    table the winner has not migrated yet (AttributeError: a column MLflow's trace-analytics step looks up, such
    as `dimension_attributes`). Another program may also hold an existing store's write lock for a while. The
    store is whole once the other is done, so the call is made again. A file that is no SQLite database at all
    is refused at once, by name.
    """
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import DatabaseError, OperationalError

    existed = db_path is not None and db_path.exists() and db_path.stat().st_size > 0
    for attempt in range(attempts if db_path is not None else 1):
        try:
            return open_store()
        except (OperationalError, CommandError, AttributeError) as exc:
            if attempt == attempts - 1 or db_path is None:
                raise
            busy = "busy with another program" if existed else "being created by another program too"
            logger.warning("the MLflow store %s is %s (%s); trying again", db_path, busy, one_line(exc))
            time.sleep(1.0)
        except DatabaseError as exc:  # "file is not a database": no retry mends it
            raise PermanentStoreError(
                f"{db_path} is not a SQLite database MLflow can open ({one_line(exc)}): move it aside, or point "
                "tracking.uri (python -m harness.report: --uri) at another store"
            ) from None
    raise AssertionError("unreachable")


class RunTracker:
    """One MLflow run, logged through its own client so trackers never share hidden state."""

    def __init__(self, uri: str, experiment: str) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._ended = False
        check_server(uri)
        db_path = sqlite_db_path(uri)
        lock = contextlib.nullcontext()
        if db_path is not None:
            # SQLite creates the file but not its directory.
            db_path.parent.mkdir(parents=True, exist_ok=True)
            # MLflow creates and migrates a fresh store's schema on first use; two processes doing it at once
            # fail ("Online migration expected to match one row"): one at a time, per store.
            lock = exclusive_lock(db_path.with_name(db_path.name + ".lock"))

        def open_store() -> tuple[Any, Any]:
            client = mlflow.MlflowClient(tracking_uri=uri)  # opens the store (creating a new one's tables)
            return client, client.get_experiment_by_name(experiment)

        with lock:
            self.client, found = _opened(open_store, db_path=db_path)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=_artifact_location(uri, experiment), tags=EXPERIMENT_TAGS
                )
            except MlflowException:
                # Another process (a parallel job) created it between our lookup and create.
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            self.experiment_id = found.experiment_id
            for key, value in EXPERIMENT_TAGS.items():
                if found.tags.get(key) != value:  # an experiment made before this tag existed
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            if found.lifecycle_stage == "deleted":
                # A deleted experiment still owns its name and refuses new runs.
                logger.warning("MLflow experiment %r was deleted; restoring it", experiment)
                self.client.restore_experiment(found.experiment_id)
        # Runs whose process died without closing them (killed, crashed) end KILLED now, with the reason.
        close_orphans(self.client, [self.experiment_id])

    @property
    def ended(self) -> bool:
        return self._ended

    def attach(self, run_id: str) -> bool:
        """Log into `run_id`, a run of this store's experiment (one a job started, then could not finish
        logging); False, and no run attached, when the store holds no such run."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.experiment_id != self.experiment_id:
            return False
        self.run_id = run_id
        return True

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
        from mlflow.tracking.context.registry import resolve_tags

        # MLflow's context providers add what fluent start_run would (mlflow.user, mlflow.source.name/type,
        # mlflow.source.git.* of sys.argv[0]'s repository); set at creation so the UI nests the run right away.
        system_tags = resolve_tags({PARENT_RUN_ID_TAG: parent_run_id} if parent_run_id else None)
        run = self.client.create_run(self.experiment_id, tags=system_tags, run_name=run_name)
        self.run_id = run.info.run_id
        self.log_params(params)
        self.set_tags(tags)
        logger.info("MLflow run %r (%s) in %r at %s", run_name, self.run_id, self.experiment, self.uri)
        return self.run_id

    # log_batch splits into MLflow's per-request limits itself, and cuts param and tag values over
    # MLflow's length limits (MLFLOW_TRUNCATE_LONG_VALUES, on by default); keys it only rejects.

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # A dict: cleaning can map two keys to one, and a batch with a duplicate key is rejected.
        cleaned = {_clean_key(key): str(value) for key, value in params.items()}
        entries = [Param(key, value) for key, value in cleaned.items()]
        self.client.log_batch(self._require_run(), params=entries, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        cleaned = {_clean_key(key): str(value) for key, value in tags.items()}
        entries = [RunTag(key, value) for key, value in cleaned.items()]
        self.client.log_batch(self._require_run(), tags=entries, synchronous=True)

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
        self.client.log_batch(run_id, metrics=entries, synchronous=True)

    def log_series(
        self,
        key: str,
        values: Sequence[float | None],
        *,
        first_step: int = 0,
        timestamps_s: Sequence[float] | None = None,
    ) -> None:
        """One metric with steps first_step.. (per-token latency etc.); a None leaves its step out.

        `timestamps_s` (epoch seconds, one per value): when each value happened, so the UI's time axis
        spreads the steps out instead of stacking them on the moment they were logged.
        """
        from mlflow.entities import Metric

        run_id = self._require_run()
        now_ms = int(time.time() * 1000)
        name = _clean_key(key)
        entries = [
            Metric(name, float(value), now_ms if timestamps_s is None else int(timestamps_s[i] * 1000), first_step + i)
            for i, value in enumerate(values)
            if value is not None
        ]
        self.client.log_batch(run_id, metrics=entries, synchronous=True)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON, or YAML when ``artifact_file`` ends in .yaml/.yml."""
        self.client.log_dict(self._require_run(), plain(obj), artifact_file)

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
            if len(reason) > MAX_FAILURE_REASON_LENGTH:
                reason = reason[: MAX_FAILURE_REASON_LENGTH - 3] + "..."
            self.set_tags({FAILURE_REASON_TAG: reason})
        self.client.set_terminated(run_id, status=status)
        self._ended = True


__all__ = [
    "FAILURE_REASON_TAG",
    "PARENT_RUN_ID_TAG",
    "ROLE_TAG",
    "RunTracker",
    "default_tracking_uri",
    "flatten",
    "sqlite_db_path",
]
