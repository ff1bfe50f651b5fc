"""A Hydra multirun as one parent MLflow run, with each job's run as its child.

Hydra instantiates the callback for every command, ``--help`` included: this module imports
no mlflow (``RunTracker`` does, when a sweep actually starts).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from harness.measurement.environment import environment_tags
from harness.tracking.client import FAILURE_REASON_TAG, ROLE_TAG, RunTracker, config_params, default_tracking_uri
from harness.tracking.orphans import owner_tags
from harness.tracking.watchdog import SweepWatchdog

logger = logging.getLogger(__name__)

PARENT_RUN_ID_FILE = "mlflow_parent_run_id"
# The same for the jobs of this process and its children (environment variables are per process: two
# sweeps in one sweep folder, same second, each hand their jobs their own parent; the file serves launchers
# whose jobs do not inherit the environment). A parent that could not be created is an error for every job.
PARENT_RUN_ID_ENV = "LAYERBENCH_PARENT_RUN_ID"
SWEEP_KEYS_ENV = "LAYERBENCH_SWEEP_KEYS"
PARENT_ERROR_ENV = "LAYERBENCH_PARENT_ERROR"
# The keys a sweep varies, for its jobs to name their runs by (JSON list, beside the parent id).
SWEEP_KEYS_FILE = "mlflow_sweep_keys.json"
SEPARATOR = "·"
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"


def sweep_keys_and_size(config: DictConfig) -> tuple[list[str], int]:
    """What a multirun varies, in order (command line, then the preset's hydra.sweeper.params), and
    how many jobs that makes; parsed by Hydra's own override grammar, so ranges and globs count too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    overrides += [f"{key}={value}" for key, value in params.items()]
    keys, size = [], 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
            size *= len(list(override.sweep_string_iterator()))
    return keys, size


def shared_params(config: DictConfig, sweep_keys: list[str]) -> dict[str, str]:
    """The settings every job of the sweep shares, as its jobs log theirs (`config_params`), less what the
    sweep varies (a varied group's settings vary with it)."""
    plain = OmegaConf.to_container(config, resolve=False, throw_on_missing=False)
    plain.pop("hydra", None)
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    groups = {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None}
    varied = tuple(sweep_keys)
    return {
        key: value for key, value in config_params(plain, groups).items()
        if not any(key == v or key.startswith(v + ".") for v in varied)
    }


def job_run_name(task_overrides: list[str], groups: tuple[str, ...], sweep_keys: list[str] | None) -> str:
    """A sweep's child: the values its sweep varies (`4bit·ram`); a standalone run: its chosen
    options that are not the defaults (`4bit·disk`), or `default`. Full choices stay params and tags."""
    values = dict(o.lstrip("+~").split("=", 1) for o in task_overrides if "=" in o)
    keys = sweep_keys if sweep_keys else [k for k in values if k in groups]
    return SEPARATOR.join(values[k].split("/")[-1] for k in keys if k in values) or "default"


def _resolve_uri(config: DictConfig) -> str:
    uri = OmegaConf.select(config, "tracking.uri", default=None)
    if uri:
        return str(uri)
    outputs = OmegaConf.select(config, "paths.outputs", default="outputs")
    # Relative to where the command was started (hydra.runtime.cwd), not to a job's chdir.
    return default_tracking_uri(Path(to_absolute_path(str(outputs))))


def _sweep_dir(config: DictConfig) -> Path:
    return Path(to_absolute_path(str(config.hydra.sweep.dir)))


def _start_ray(config: DictConfig, env: dict[str, str]) -> None:
    """With hydra/launcher=ray, start Ray here, before the launcher would, for two reasons:

    - `env` (the parent's id) must reach every job, on this machine or a cluster's others, where a file in
      the sweep folder reaches only a shared filesystem: Ray's runtime_env carries it (the user's own
      runtime_env variables are kept);
    - Ray's workers import Ray (and its threads) before harness, too late for `one_arena`: the environment sets
      glibc's arena limit as each worker starts (MALLOC_ARENA_MAX; a user's own value is kept);
    - Ray's driver replaces the SIGTERM handler with one that aborts the process, which would leave the
      parent RUNNING: the handlers in place before are put back.

    The launcher then finds Ray running and uses it. Its own init settings apply, less the small object
    store it sets for its CI, which ray.init refuses when it joins a running cluster.
    """
    if OmegaConf.select(config, "hydra.launcher._target_", default=None) != RAY_LAUNCHER:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()  # an earlier sweep's in this process: its runtime_env names the other parent
    init = OmegaConf.to_container(config.hydra.launcher.ray.init, resolve=True)
    runtime_env = dict(init.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {"MALLOC_ARENA_MAX": "1", **env, **(runtime_env.get("env_vars") or {})}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(runtime_env=runtime_env, **init)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


class MlflowSweepCallback(Callback):
    """Makes a Hydra multirun one parent MLflow run, with each job's run as its child.

    The parent run id reaches the jobs through this process's environment (the basic launcher's jobs run
    here), Ray's runtime_env (hydra/launcher=ray, on any machine) and a file in the sweep directory (other
    launchers that share the filesystem). Jobs that ran elsewhere end elsewhere: the parent then counts
    its children in the store. Hydra's BasicSweeper re-raises a failed job's exception after its batch, so
    ``on_multirun_end`` never runs then: an atexit handler closes the parent on that path.
    """

    def __init__(self) -> None:
        self.tracker: RunTracker | None = None
        self.watchdog: SweepWatchdog | None = None
        self.jobs = 0
        self.failed_jobs: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        self.shared_params: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Launchers that run jobs in other processes (joblib, submitit) pickle the callbacks; a lock
        # cannot be pickled, and the parent run belongs to the process that started the sweep.
        state = self.__dict__.copy()
        state["_lock"] = None
        state["tracker"] = None
        state["watchdog"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for name in (PARENT_RUN_ID_ENV, SWEEP_KEYS_ENV, PARENT_ERROR_ENV):
            os.environ.pop(name, None)  # an earlier sweep's, in this process
        sweep_dir = _sweep_dir(config)
        id_file = sweep_dir / PARENT_RUN_ID_FILE
        # A reused sweep dir must not hand this sweep's jobs an older sweep's parent.
        id_file.unlink(missing_ok=True)
        (sweep_dir / SWEEP_KEYS_FILE).unlink(missing_ok=True)
        if not OmegaConf.select(config, "tracking.enabled", default=True):
            return
        uri = _resolve_uri(config)
        experiment = str(OmegaConf.select(config, "tracking.experiment", default="layerbench"))
        outputs = OmegaConf.select(config, "paths.outputs", default=None)
        tags = environment_tags(Path(to_absolute_path(str(outputs))) if outputs else None)
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
        tags.update(
            {"hydra.sweep_dir": str(sweep_dir), "hydra.overrides": " ".join(overrides), ROLE_TAG: "parent",
             **owner_tags()}
        )
        keys, size = sweep_keys_and_size(config)
        self.shared_params = shared_params(config, keys)
        try:
            tracker = RunTracker(uri, experiment)
            name = f"sweep {'×'.join(keys) or 'of one job'} ({size}) {sweep_dir.name}"
            tracker.start(run_name=name, params={}, tags=tags)
        except Exception as exc:
            # Hydra turns a callback's exception into a warning and runs the jobs anyway; they would log
            # orphans under no parent. They fail instead, with this reason (parent_run_id_for_job).
            os.environ[PARENT_ERROR_ENV] = f"{type(exc).__name__}: {exc}"
            _start_ray(config, {PARENT_ERROR_ENV: os.environ[PARENT_ERROR_ENV]})
            raise
        self.tracker = tracker
        # Closes the parent and its running child should this process be killed outright.
        self.watchdog = SweepWatchdog(tracker.uri, tracker.experiment_id, str(tracker.run_id))
        atexit.register(self._close_at_exit)
        os.environ[PARENT_RUN_ID_ENV] = str(tracker.run_id)
        os.environ[SWEEP_KEYS_ENV] = json.dumps(keys)
        _start_ray(config, {PARENT_RUN_ID_ENV: str(tracker.run_id), SWEEP_KEYS_ENV: json.dumps(keys)})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_KEYS_FILE).write_text(json.dumps(keys) + "\n", encoding="utf-8")
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

    def _count_children(self, *, finished_sweep: bool) -> None:
        """The jobs' outcomes from the store, for jobs that ran in other processes. A stopped sweep's jobs
        stop with it (Ray ends a driver's tasks when the driver exits), and a job killed outright cannot end
        its own run: the parent ends those still RUNNING as KILLED."""
        from harness.report.fetch import fetch_runs

        assert self.tracker is not None
        client = self.tracker.client
        children = fetch_runs(client, self.tracker.experiment_id, parent_run_id=self.tracker.run_id, status="ALL")
        self.jobs = len(children)
        self.failed_jobs = []
        for run in children:
            status = run.info.status
            if status == "RUNNING" and not finished_sweep:
                client.set_tag(run.info.run_id, FAILURE_REASON_TAG, "the sweep was stopped before this job ended")
                client.set_terminated(run.info.run_id, status="KILLED")
                status = "KILLED"
            if status != "FINISHED":
                self.failed_jobs.append(f"{run.info.run_name}: {status}")

    def _close(self, *, finished_sweep: bool) -> None:
        with self._lock:
            if self.tracker is None or self._closed:
                return
            self._closed = True
            if self.jobs == 0:
                # The jobs ran in other processes (hydra/launcher=ray): what ended is in the store.
                self._count_children(finished_sweep=finished_sweep)
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
            try:
                from harness.report.sweep_summary import summarize_sweep

                summarize_sweep(self.tracker, self.shared_params)
            except Exception:  # the comparison is a convenience: the parent must still be closed
                logger.exception("could not log the sweep's comparison on its parent run")
            self.tracker.end("FAILED" if reason else "FINISHED", reason=reason)
            if os.environ.get(PARENT_RUN_ID_ENV) == self.tracker.run_id:
                # A later run in this process is not this sweep's job.
                os.environ.pop(PARENT_RUN_ID_ENV, None)
                os.environ.pop(SWEEP_KEYS_ENV, None)
            if self.watchdog is not None:
                self.watchdog.stop()
            logger.info("MLflow parent run %s closed: %s", self.tracker.run_id, reason or "FINISHED")


def _sweep_file(name: str, env: str) -> str | None:
    """What the sweep's parent left its jobs: in the environment, else in a file in the sweep folder; None in
    RUN mode, outside Hydra, or when the sweep is not tracked."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if os.environ.get(PARENT_ERROR_ENV):
        raise RuntimeError(f"the sweep's MLflow parent run could not be created: {os.environ[PARENT_ERROR_ENV]}")
    if os.environ.get(env):
        return os.environ[env]
    try:
        return (Path(to_absolute_path(str(HydraConfig.get().sweep.dir))) / name).read_text(encoding="utf-8")
    except OSError:
        return None


def sweep_keys_for_job() -> list[str] | None:
    """Inside a multirun job, the keys its sweep varies."""
    text = _sweep_file(SWEEP_KEYS_FILE, SWEEP_KEYS_ENV)
    return None if text is None else list(json.loads(text))


def parent_run_id_for_job() -> str | None:
    """Inside a multirun job, the sweep's parent run id."""
    return (_sweep_file(PARENT_RUN_ID_FILE, PARENT_RUN_ID_ENV) or "").strip() or None


__all__ = ["MlflowSweepCallback", "job_run_name", "parent_run_id_for_job", "sweep_keys_for_job"]
