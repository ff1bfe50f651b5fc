"""A throwaway Hydra app with the MLflow sweep callback, started as a sweep in a subprocess (for tests in any
folder: tests/, the rootdir conftest's folder, is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


# A throwaway Hydra app: only harness.tracking, none of the rest of the harness.
APP = textwrap.dedent(
    """
    import time
    from pathlib import Path

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.utils import to_absolute_path
    from omegaconf import OmegaConf

    from harness.tracking.client import RunTracker, default_tracking_uri, flatten
    from harness.sweep import parent_run_id_for_job

    ConfigStore.instance().store(
        name="app",
        node={
            "x": 0,
            "fail_on": -1,
            "sleep_s": 0,
            "tracking": {"enabled": True, "uri": None, "experiment": "sweep"},
            "paths": {"outputs": "outputs"},
            "hydra": {"callbacks": {"mlflow_sweep": {"_target_": "harness.sweep.MlflowSweepCallback"}}},
        },
    )


    @hydra.main(version_base="1.3", config_path=None, config_name="app")
    def main(cfg):
        parent = parent_run_id_for_job()  # first, as harness.__main__ asks: before any store is opened
        uri = cfg.tracking.uri or default_tracking_uri(Path(to_absolute_path(cfg.paths.outputs)))
        tracker = RunTracker(uri, cfg.tracking.experiment)
        tracker.start(
            run_name=f"x={cfg.x}",
            params=flatten(OmegaConf.to_container(cfg)),
            tags={"layerbench.role": "child"},
            parent_run_id=parent,
        )
        time.sleep(cfg.sleep_s)  # a job long enough to be killed in
        if cfg.x == cfg.fail_on:
            tracker.end("FAILED", reason=f"x={cfg.x} is the failing value")
            raise RuntimeError("job failed on purpose")
        tracker.log_metrics({"x": float(cfg.x), "tpot_s": 0.1 * cfg.x})
        tracker.end()


    if __name__ == "__main__":
        main()
    """
)


def _start_sweep(cwd: Path, *overrides: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    app = cwd / "app.py"
    app.write_text(APP)
    env = dict(os.environ)
    # The app must find this checkout's harness even where the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, str(app), "-m", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
