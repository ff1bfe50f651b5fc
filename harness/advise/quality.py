"""`advise.min_top1`: the compressions whose top-1 agreement with the uncompressed model, on this model, is below
the floor are left out. The figure is the newest one logged for the model and compression (`quality_top1_agreement`,
which a compressed run with quality.enabled=true logs); where none is, one short run measures it."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import strategies
from harness.advise.space import Refused, job_overrides
from harness.config import Config

log = logging.getLogger(__name__)
METRIC = "quality_top1_agreement"


def logged_top1(uri: str, model: str, compression: str) -> float | None:
    """The newest `quality_top1_agreement` logged for `model` stored with `compression`, in any experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"params.model = '{model}' and params.compression = '{compression}' and metrics.{METRIC} >= 0",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].data.metrics[METRIC] if runs else None


def measure_top1(overrides: Sequence[str], compression: str) -> None:
    """One short compressed run with its quality measured and logged (its exit status is not the advisor's)."""
    command = [
        sys.executable, "-m", "harness", *job_overrides(overrides), f"compression={compression}",
        "quality.enabled=true", "reference.enabled=false", "workload.max_new_tokens=2", "bench.warmup=0",
        "bench.repeats=1",
    ]
    log.info("measuring compression=%s's top-1 agreement once: %s", compression, " ".join(command[2:]))
    subprocess.run(command, check=False)


def keep_above(
    cfg: Config, combos: Sequence[dict[str, str]], floor: float, overrides: Sequence[str] = (),
) -> tuple[list[dict[str, str]], list[Refused]]:
    """`combos` less those whose compression agrees with the uncompressed model on fewer than `floor` of its
    top-1 tokens; those are Refused with the figure."""
    from harness.tracking.client import default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri(Path(cfg.paths.outputs))
    options = strategies.option_configs()["compression"]
    below: dict[str, str] = {}
    for name in sorted({c["compression"] for c in combos}):
        if not strategies.build(options[name]()).lossy:
            continue
        top1 = logged_top1(uri, cfg.model.name, name)
        if top1 is None:
            measure_top1(overrides, name)
            top1 = logged_top1(uri, cfg.model.name, name)
        if top1 is None:
            below[name] = f"compression={name}: its top-1 agreement on {cfg.model.name} could not be measured"
        elif top1 < floor:
            below[name] = (
                f"compression={name}: top-1 agreement {top1:.3f} with the uncompressed model on {cfg.model.name}, "
                f"below advise.min_top1={floor}"
            )
    kept = [c for c in combos if c["compression"] not in below]
    return kept, [Refused(c, below[c["compression"]]) for c in combos if c["compression"] in below]
