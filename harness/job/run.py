"""One job, whichever runner generates: refuse what it cannot run, open its MLflow run, measure, log, summarize."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from harness.allocator import host_malloc
from harness.config import GROUPS, OPTION_GROUPS, Config, RunnerUnavailable, explicit_groups
from harness.device import resolve_device
from harness.job.measure import Outcome, measure
from harness.measurement.environment import environment_tags
from harness.measurement.hostload import speed_warning
from harness.measurement.memory import reset_peak_rss
from harness.measurement.metrics import inter_token_latencies
from harness.measurement.plots import plot_token_latency
from harness.measurement.run_report import BY_GENERATION, RunReport
from harness.measurement.stats import COMPARED
from harness.measurement.summary import caveats, print_summary
from harness.measurement.units import format_metric
from harness.runners.base import runner_class
from harness.split.direct import refuse_weight_readers
from harness.tracking.client import RunTracker, config_params, default_tracking_uri
from harness.tracking.orphans import RECORD_TAG, owner_tags
from harness.tracking.process import Tracker
from harness.tracking.record import RunRecord, TrackingFailed, one_line, replay, retried

log = logging.getLogger(__name__)


# The figures a reader of the runs table looks for first, in the run's description (mlflow.note.content).
NOTE_FIGURES = (
    ("TTFT", "ttft_s"), ("per token", "tpot_s"), ("floor ratio", "floor_ratio"), ("peak RSS", "peak_rss_bytes"),
    ("peak VRAM", "peak_vram_nvml_bytes"), ("top-1 vs uncompressed", "quality_top1_agreement"),
    ("KL", "quality_kl_mean"), ("vs transformers", "tpot_ratio_vs_reference"),
)


def run_note(label: str, report: RunReport) -> str:
    """`**4bit·ram**: TTFT 0.0580 s · per token 0.00550 s · ...`, measured figures only."""
    parts = [f"{name} {format_metric(key, getattr(report, key))}" for name, key in NOTE_FIGURES
             if getattr(report, key) is not None]
    return f"**{label}**: " + " · ".join(parts)


def profile_dir(outputs_dir: Path) -> Path:
    """Where bench.profile writes: the Hydra job's own folder (beside .hydra/ and the job's log); outside Hydra
    (the GPU check calls jobs directly), a new folder under outputs/profiles."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / "profile"
    (outputs_dir / "profiles").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S-"), dir=outputs_dir / "profiles"))


def run_job(
    cfg: Config,
    resolved: Mapping[str, Any],
    *,
    choices: Mapping[str, str],
    overrides: list[str],
    parent_run_id: str | None = None,
    console: Console | None = None,
    run_name: str | None = None,
    tracker: Tracker | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunReport | None:
    """Run one configuration end to end; the MLflow run ends FAILED with the reason if anything raises (KILLED
    when interrupted). Everything is logged to the job's record on disk first, then replayed into the store;
    a store that fails for `tracking.retry_s` raises TrackingFailed, naming the record, after the summary.

    None: a runner that cannot run here was skipped (`runner.skip_unavailable`), and no run was logged.
    `tracker`: the store, opened by the caller (the CLI opens it in a process of its own, early); by default
    this job opens it here when `tracking.enabled`. `tags`: the caller's own, on the run beside the job's.
    Host memory is allocated as `bench.host_malloc` says for the job's span.
    """
    with host_malloc(cfg.bench.host_malloc):
        return _run_job(
            cfg, resolved, choices=choices, overrides=overrides, parent_run_id=parent_run_id, console=console,
            run_name=run_name, tracker=tracker, tags=tags,
        )


def _run_job(
    cfg: Config,
    resolved: Mapping[str, Any],
    *,
    choices: Mapping[str, str],
    overrides: list[str],
    parent_run_id: str | None,
    console: Console | None,
    run_name: str | None,
    tracker: Tracker | None,
    tags: Mapping[str, str] | None,
) -> RunReport | None:
    console = console or Console()
    outputs_dir = Path(cfg.paths.outputs).resolve()
    runner_cls = runner_class(cfg)
    try:
        # Before the run exists: a runner that cannot run these options logs nothing.
        options = runner_cls.check(cfg, explicit_groups(overrides))
    except RunnerUnavailable as exc:
        if not cfg.runner.skip_unavailable:
            raise
        log.warning("skipped: %s", exc)
        console.print(Text(f"skipped: {exc}", style="yellow"))
        return None
    # A model generated straight into its splits has no weights for a reference, a peer or the quality pass.
    refuse_weight_readers(cfg)
    # Each group's option as the runner runs it: where that is its own default, not this config's, the config's
    # settings of that group are none of its params; a group it has no counterpart for is none at all.
    own = {group for group, option in options.items() if option is getattr(cfg, group)}
    choices = {k: v for k, v in choices.items() if k not in OPTION_GROUPS or k in own}
    choices |= {group: option.name for group, option in options.items() if group not in own}
    resolved = {k: v for k, v in resolved.items() if k not in OPTION_GROUPS or k in own}
    reset_peak_rss()  # the peak of this job, not of the sweep's jobs before it in this process
    uri = cfg.tracking.uri or default_tracking_uri(outputs_dir)
    if not cfg.tracking.enabled:
        tracker = None
    elif tracker is None:
        tracker = RunTracker(uri, cfg.tracking.experiment)
    # Everything the run logs goes to its record on disk first: a store that fails loses nothing measured.
    record = RunRecord(record_dir(outputs_dir), uri=uri, experiment=cfg.tracking.experiment)
    # Named by the caller (the CLI: what the sweep varies); else by every choice.
    label = run_name or " ".join(f"{g}={choices[g]}" for g in GROUPS if g in choices) or "default"
    start = {
        "run_name": label,
        "params": config_params(resolved, choices),
        # With the outputs folder: hw.disk names the disk the splits are read from.
        "tags": {**environment_tags(outputs_dir), "hydra.overrides": " ".join(overrides), **(tags or {}),
                 **owner_tags(), RECORD_TAG: str(record.folder)},
        "parent_run_id": parent_run_id,
    }
    record.start(**start)
    record.catch_faults()
    retry_s = cfg.tracking.retry_s
    if tracker is not None:
        record.data["run_id"] = retried(tracker.start, time.monotonic() + retry_s, uri, None, **start)
        record.save()
    profile_to = profile_dir(outputs_dir) if cfg.bench.profile else None
    try:
        runner = runner_cls(cfg, options, resolve_device(cfg.device), outputs_dir)
        outcome = measure(runner, cfg, outputs_dir, console, profile_to)
        if profile_to is not None:
            outcome.profile_dir = profile_to
            outcome.tags["profile.dir"] = str(profile_to)
            console.print(Text(f"profile: {profile_to} (open trace.json.gz in ui.perfetto.dev)"))
        if cfg.model.weights_note:
            outcome.tags["model.weights"] = cfg.model.weights_note
        log_run(record, resolved, outcome, label)
        record.end("FINISHED")
        record.release_faults()
    except BaseException as exc:
        # Stopped from outside is KILLED: Ctrl-C, SIGTERM through harness.__main__, or the process made to exit
        # (a Ray worker whose sweep's driver is gone raises SystemExit in its task). Anything else is FAILED.
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        record.end(status, reason)
        record.release_faults()
        if tracker is not None:
            try:
                tracker.end(status, reason=reason)
            except Exception as store_error:  # the job's own error is the one to report
                log.warning("could not close the run in %s: %s", uri, one_line(store_error))
        if profile_to is not None:
            with contextlib.suppress(OSError):  # only if empty: a job that failed after its profile keeps it
                profile_to.rmdir()
        raise
    hidden, notes = caveats(cfg.model, outcome.report)
    summary = Console(record=True, file=io.StringIO(), width=120)
    print_summary(summary, choices, outcome.report, outcome.texts[0], hidden, notes)
    record.log_text(summary.export_text(), "summary.txt")
    # Printed before the store is written: a failing store still leaves the user the figures.
    print_summary(console, choices, outcome.report, outcome.texts[0], hidden, notes)
    if tracker is not None:
        try:
            replay(record, tracker, retry_s=retry_s)
        except TrackingFailed as exc:
            with contextlib.suppress(Exception):  # one try: the store has just failed for `retry_s`
                tracker.end("FAILED", reason=f"its logging failed; what it measured is in {record.folder}")
            raise exc from None
    return outcome.report


def record_dir(outputs_dir: Path) -> Path:
    """A new folder for the job's record: `record/` in the Hydra job's folder (beside .hydra/ and its log),
    `record-XXXX/` there when two jobs share it (two runs started in the same second); outside Hydra, a new
    folder under outputs/records."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            (job_dir / "record").mkdir()
            return job_dir / "record"
        except FileExistsError:
            return Path(tempfile.mkdtemp(prefix="record-", dir=job_dir))
    (outputs_dir / "records").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S-"), dir=outputs_dir / "records"))


def log_run(tracker: Tracker | RunRecord, resolved: Mapping[str, Any], outcome: Outcome, label: str) -> None:
    """Metrics, step series, tags and artifacts of a finished job."""
    report, gen = outcome.report, outcome.gen
    latencies = inter_token_latencies(gen.token_times_s)
    tracker.log_metrics(report.metrics())
    # Step = the token's number (2..N), as in token_latency.png; timestamps = when each token arrived.
    to_epoch = time.time() - time.perf_counter()
    tracker.log_series(
        "token_latency_s", latencies, first_step=2, timestamps_s=[t + to_epoch for t in gen.token_times_s[1:]]
    )
    # Each measured generation's compared figures (step = its number): the samples that comparisons between runs
    # resample (harness.measurement.stats), as whole generations.
    for name in COMPARED:
        tracker.log_series(f"{name}{BY_GENERATION}", [m.get(name) for m in outcome.per_generation], first_step=1)
    tracker.log_dict(dict(resolved), "config.yaml")
    # The first sequence flat, as with one prompt; a batch adds every sequence beside it.
    generation: dict[str, Any] = {
        "prompt_ids": gen.prompts[0], "generated_ids": gen.sequences[0], "text": outcome.texts[0],
    }
    if len(gen.sequences) > 1:
        generation["sequences"] = [
            {"prompt_ids": p, "generated_ids": g, "text": t}
            for p, g, t in zip(gen.prompts, gen.sequences, outcome.texts, strict=True)
        ]
    tracker.log_dict(generation, "generation.json")
    tags = dict(outcome.tags)
    tags["mlflow.note.content"] = run_note(label, report)
    if report.agreement_vs_transformers is not None and report.agreement_vs_transformers < 1:
        # Loud: a run that decodes other tokens than transformers is a finding, not a footnote.
        tags["warning.agreement"] = (
            f"{report.agreement_vs_transformers:.0%} of greedy tokens agree with transformers' generate "
            "of the uncompressed checkpoint"
        )
        log.warning(tags["warning.agreement"])
    if skew := speed_warning(report.host_loop_s, report.reference_host_loop_s):
        tags["warning.host_speed"] = skew
        log.warning(skew)
    tracker.set_tags(tags)
    with tempfile.TemporaryDirectory() as tmp:
        # Titled with the run's label: side by side in MLflow's compare view, plots name their run.
        outcome.runner.log_artifacts(tracker, Path(tmp), label, gen)
        if latencies:
            plot_token_latency(latencies, Path(tmp) / "token_latency.png", f"{label}: per-token latency")
            tracker.log_artifact(Path(tmp) / "token_latency.png")
    if outcome.profile_dir is not None:
        for path in sorted(outcome.profile_dir.iterdir()):
            tracker.log_artifact(path, "profile")
