"""`python -m harness [overrides]`: one job, or a sweep with -m."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from harness.compose import conf_dir, register_configs, validated
from harness.config import GROUPS, Config
from harness.extras import install_line, installed
from harness.signals import raise_on_sigterm


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def main(dcfg: DictConfig) -> None:
    # Relative paths are relative to where the command was started, whatever Hydra's run dir is.
    dcfg.paths.outputs = to_absolute_path(dcfg.paths.outputs)
    # Every __post_init__ runs here, and unknown keys are refused: bad input fails before anything is loaded.
    cfg = validated(dcfg)
    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode == RunMode.RUN
    if cfg.plan.only:  # before MLflow starts: the plan alone builds, runs and logs nothing
        plan_only(cfg, single)
        return
    tracker = None
    if cfg.tracking.enabled and single:
        # MLflow starts in a process of its own, alongside the imports below. A sweep's jobs track in-process:
        # its driver has mlflow imported already, and its parent run closes the runs of jobs that die with it.
        from harness.tracking.client import default_tracking_uri
        from harness.tracking.process import TrackerProcess

        tracker = TrackerProcess(cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs), cfg.tracking.experiment)
    # Imported here so `--help` and config errors answer before torch and transformers load.
    from harness.tracking.record import TrackingFailed

    try:
        from harness.job.run import run_job
        from harness.sweep import job_run_name, parent_run_id_for_job, sweep_keys_for_job

        choices = {group: hydra_cfg.runtime.choices[group] for group in GROUPS}
        overrides = list(hydra_cfg.overrides.task)
        run_job(
            cfg,
            OmegaConf.to_container(dcfg, resolve=True),
            choices=choices,
            overrides=overrides,
            parent_run_id=parent_run_id_for_job(),
            run_name=job_run_name(overrides, GROUPS, sweep_keys_for_job()),
            tracker=tracker,
        )
    except TrackingFailed as exc:
        if not single:
            raise  # the sweep counts the job failed, with this reason
        # A known failure, said in one message: what was measured, where it is, how to log it later.
        sys.exit(f"error: {exc}")
    finally:
        if tracker is not None:
            tracker.close()
    global single_job_done
    single_job_done = single


# Set when a single job (not a sweep's) has returned: everything it makes is written and logged.
single_job_done = False


def plan_only(cfg: Config, single: bool) -> None:
    """plan.only=true: print the streamed run's plan and stop. A plan that cannot run (over the cap, a split that
    cannot exist) exits non-zero with the reason; in a sweep it fails that job."""
    global single_job_done
    from harness.allocator import host_malloc
    from harness.runners.layerbench.plan_only import PlanRefused, print_plan

    try:
        with host_malloc(cfg.bench.host_malloc):  # its probes measure as the run would
            print_plan(cfg)
    except PlanRefused as exc:
        if not single:
            raise
        sys.exit(f"error: {exc}")
    single_job_done = single


def missing_launcher(argv: list[str]) -> str | None:
    """What to install when the command line asks for a launcher whose Hydra plugin is absent (Hydra itself
    would only list the launchers it has, after the sweep's parent run exists)."""
    if not any(arg.lstrip("+") == "hydra/launcher=ray" for arg in argv):
        return None
    if installed("hydra_plugins.hydra_ray_launcher"):
        return None
    return f"hydra/launcher=ray needs Hydra's Ray launcher: {install_line('ray')}"


if __name__ == "__main__":
    if (problem := missing_launcher(sys.argv[1:])) is not None:
        sys.exit(problem)
    raise_on_sigterm()  # the job's MLflow run and a sweep's parent close KILLED, not left RUNNING
    register_configs()
    main()
    if single_job_done:
        # Tearing down the interpreter's modules (torch, transformers) takes 1-2 s here and does nothing a
        # finished job needs. Not after a sweep: its atexit handlers matter (Ray stops the local cluster it
        # started), and a failure never gets here (Hydra exits 1 first).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
