"""A job's run on disk: everything it logs, written to its run folder before any of it reaches MLflow.

`RunRecord` has a tracker's methods and writes each call to `<folder>/run.json` (params, tags, metrics,
series) and `<folder>/artifacts/` (files), replacing run.json whole each time. A job logs to its record first,
then `replay`s the record into the store; when the store fails (its process dies, its disk fills, another
program locks it), what was measured stays in the folder, and `python -m harness.report --import <folder>`
logs it once the store works again. The same `replay` serves both.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.files import write_atomic
from harness.tracking.orphans import FAULT_FILE

log = logging.getLogger(__name__)

RECORD_FILE = "run.json"
ARTIFACTS = "artifacts"


class TrackingFailed(RuntimeError):
    """The store could not take a run's logging, even after retrying; its record on disk still holds it all."""

    @classmethod
    def of(cls, uri: str, error: BaseException, record: RunRecord | None) -> TrackingFailed:
        """The one message: the store, its error, and where the measurements are (`record` None: the run could not
        start, and nothing was measured). Built here, so that the exception holds only its text and pickles like
        any other."""
        if record is None:
            then = "Nothing was measured yet: fix the store, or run with tracking.enabled=false"
        else:
            then = (f"Everything measured is in {record.folder}; log it once the store works again: "
                    f"{import_command(record.folder)}")
        return cls(f"could not log to {uri} ({one_line(error)}). {then}")


class PermanentStoreError(RuntimeError):
    """A store failure that retrying cannot mend: the tracking process has exited, or the file is no store."""


def plain(obj: Any) -> Any:
    """A copy that JSON and `yaml.safe_dump` write readably: configs as containers, numpy and torch scalars as
    numbers, anything else unknown as its text (MLflow's own writers would stringify a whole DictConfig or tag
    Python classes that `yaml.safe_load` refuses)."""
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=True, throw_on_missing=False)
    if isinstance(obj, Mapping):
        return {str(key): plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [plain(value) for value in obj]
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):
        return obj.item()  # a numpy or torch scalar (float64 too: yaml tags the float subclass)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def import_command(folder: Path) -> str:
    return f"python -m harness.report --import {folder}"


class RunRecord:
    """One run's params, tags, metrics, series and artifacts in a folder, with a tracker's methods."""

    def __init__(self, folder: Path, *, uri: str | None = None, experiment: str | None = None) -> None:
        self.folder = Path(folder)
        self.data: dict[str, Any] = {
            "uri": uri, "experiment": experiment, "run_id": None, "run_name": None, "parent_run_id": None,
            "status": "RUNNING", "reason": None, "params": {}, "tags": {}, "metrics": {}, "series": {},
            "artifacts": [], "logged": False,
        }

    @classmethod
    def load(cls, folder: Path) -> RunRecord:
        """The record in `folder` (a run folder, or the job folder holding one as `record/`)."""
        folder = Path(folder)
        if not (folder / RECORD_FILE).is_file() and (folder / "record" / RECORD_FILE).is_file():
            folder = folder / "record"
        path = folder / RECORD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path} does not exist: name a job's folder (it holds record/{RECORD_FILE})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} cannot be read as a run's record ({exc})") from None
        record = cls(folder)
        record.data.update(data)
        return record

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / RECORD_FILE, json.dumps(self.data, indent=1, default=str).encode())

    @property
    def run_id(self) -> str | None:
        return self.data["run_id"]

    @property
    def ended(self) -> bool:
        return self.data["status"] != "RUNNING"

    # A tracker's methods: each writes the record at once.

    def start(self, *, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str],
              parent_run_id: str | None = None) -> None:
        self.data.update(run_name=run_name, parent_run_id=parent_run_id)
        self.data["params"].update({k: str(v) for k, v in params.items()})
        self.data["tags"].update({k: str(v) for k, v in tags.items()})
        self.save()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.data["params"].update({k: str(v) for k, v in params.items()})
        self.save()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.data["tags"].update({k: str(v) for k, v in tags.items()})
        self.save()

    def log_metrics(self, metrics: Mapping[str, float | None]) -> None:
        self.data["metrics"].update({k: float(v) for k, v in metrics.items() if v is not None})
        self.save()

    def log_series(self, key: str, values: Sequence[float | None], *, first_step: int = 0,
                   timestamps_s: Sequence[float] | None = None) -> None:
        self.data["series"][key] = {
            "values": [None if v is None else float(v) for v in values], "first_step": first_step,
            "timestamps_s": None if timestamps_s is None else [float(t) for t in timestamps_s],
        }
        self.save()

    def _artifact(self, name: str, artifact_path: str | None) -> Path:
        path = self.folder / ARTIFACTS / (artifact_path or "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data["artifacts"].append([str(path.relative_to(self.folder / ARTIFACTS)), artifact_path])
        return path

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        *where, name = artifact_file.split("/")
        path = self._artifact(name, "/".join(where) or None)
        if name.endswith((".yaml", ".yml")):
            text = yaml.safe_dump(plain(obj), sort_keys=False)
        else:
            text = json.dumps(plain(obj), indent=2)
        write_atomic(path, text.encode())
        self.save()

    def log_text(self, text: str, artifact_file: str) -> None:
        *where, name = artifact_file.split("/")
        write_atomic(self._artifact(name, "/".join(where) or None), text.encode())
        self.save()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    inner = child.parent.relative_to(path).as_posix()
                    self.log_artifact(child, "/".join(p for p in (artifact_path, inner) if p and p != ".") or None)
            return
        shutil.copyfile(path, self._artifact(path.name, artifact_path))
        self.save()

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        self.data.update(status=status, reason=reason)
        self.save()

    def catch_faults(self) -> None:
        """Have Python's faulthandler write a crash's signal and traceback to the record's fault file: a process
        killed by a bus error (a mapped file truncated under it) leaves nothing else to tell why it died."""
        self._fault_file = open(self.folder / FAULT_FILE, "w")  # noqa: SIM115 (kept open for faulthandler)
        faulthandler.enable(self._fault_file)

    def release_faults(self) -> None:
        """Stop writing crashes to the fault file, and remove it when nothing crashed."""
        if (fault_file := getattr(self, "_fault_file", None)) is not None:
            faulthandler.disable()
            fault_file.close()
            path = Path(fault_file.name)
            if path.stat().st_size == 0:
                path.unlink()
            self._fault_file = None


def replay(record: RunRecord, tracker: Any, *, retry_s: float, started: bool = True) -> None:
    """Log what `record` holds to `tracker`'s store and end the run with the record's status; each call is
    retried for up to `retry_s` seconds in all. `started`: the tracker's run exists (the job started it, with
    the record's params) and is logged into; else a new run is started with them. Raises TrackingFailed when
    the store does not take it."""
    deadline = time.monotonic() + retry_s
    data = record.data

    def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return retried(method, deadline, getattr(tracker, "uri", data["uri"]), record, *args, **kwargs)

    if not started:
        run_id = call(tracker.start, run_name=data["run_name"], params=data["params"], tags=data["tags"],
                      parent_run_id=data["parent_run_id"])
        record.data["run_id"] = run_id
    call(tracker.log_metrics, data["metrics"])
    for key, series in data["series"].items():
        call(tracker.log_series, key, series["values"], first_step=series["first_step"],
             timestamps_s=series["timestamps_s"])
    call(tracker.set_tags, data["tags"])
    for relative, artifact_path in data["artifacts"]:
        call(tracker.log_artifact, record.folder / ARTIFACTS / relative, artifact_path)
    call(tracker.end, data["status"] if data["status"] != "RUNNING" else "FINISHED", reason=data["reason"])
    record.data["logged"] = True
    record.save()


def retried(method: Callable[..., Any], deadline: float, uri: str | None, record: RunRecord | None, *args: Any,
            **kwargs: Any) -> Any:
    """`method(*args, **kwargs)`, tried again (with waits from 0.5 s to 5 s) until `deadline`; then TrackingFailed
    naming the store `uri`, the error and `record`'s folder (None: nothing measured yet)."""
    wait = 0.5
    while True:
        try:
            return method(*args, **kwargs)
        except PermanentStoreError as exc:
            error: Exception = exc
        except Exception as exc:
            error = exc
            if time.monotonic() + wait < deadline:
                log.warning("the MLflow store did not take the run's logging (%s); trying again in %.1f s",
                            one_line(exc), wait)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
                continue
        raise TrackingFailed.of(uri or "the MLflow store", error, record) from error


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters: a library's error, without its SQL."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
