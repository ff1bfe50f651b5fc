"""One job: build or find the checkpoint, split it, stream it, measure it, log it."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.text import Text

import strategies
from harness.checkpoints.generated import ensure_checkpoint
from harness.config import Config
from harness.device import resolve_device
from harness.job.comparisons import (
    compression_quality,
    floor_metrics,
    kept_mapping_metrics,
    read_metrics,
    reference_metrics,
)
from harness.job.plan import make_plan
from harness.job.streamer import Streamer, build_streamer, eos_ids, generate
from harness.measurement.environment import environment_tags
from harness.measurement.hostload import HostLoad, speed_warning
from harness.measurement.memory import peak_rss_bytes, reset_peak_rss
from harness.measurement.metrics import aggregate, inter_token_latencies, token_metrics
from harness.measurement.plots import plot_pass, plot_token_latency
from harness.measurement.profile import record
from harness.measurement.run_report import RunReport
from harness.measurement.summary import print_summary
from harness.measurement.timeline import CROSSCHECK_TOLERANCE, per_pass, stage_metrics
from harness.measurement.units import format_metric
from harness.measurement.vram import DeviceAllocs, VramMonitor
from harness.probe.floor import LINKS
from harness.streaming.model import Generation
from harness.tracking.client import RunTracker, config_params, default_tracking_uri
from harness.tracking.process import Tracker

log = logging.getLogger(__name__)


def generation_metrics(streamer: Streamer, gen: Generation) -> dict[str, float]:
    """Everything one generation measured: token timing, bytes per pass, stage shares and the cross-check."""
    rows = gen.timeline.rows(streamer.runner.stages)
    read_per_pass = per_pass(rows, "read_bytes")
    metrics = token_metrics(gen.start_s, gen.token_times_s, gen.sequences)
    metrics.update(
        prompt_tokens=float(len(gen.prompt_ids)),
        passes=float(len(read_per_pass)),
        read_bytes_per_pass=sum(read_per_pass) / len(read_per_pass),
        read_bytes_first_pass=read_per_pass[0],
        h2d_bytes_per_pass=sum(per_pass(rows, "h2d_bytes")) / len(read_per_pass),
        decode_bytes_per_pass=sum(per_pass(rows, "decode_bytes")) / len(read_per_pass),
    )
    metrics.update(gen.metrics)
    overlapped = streamer.pipeline.prefetcher.layers_ahead > 0
    metrics.update(stage_metrics(rows, gen.timeline.pass_walls(streamer.runner.stages), overlapped))
    if gen.kv_cache_bytes is not None and gen.kv_cache_tokens:
        metrics["kv_cache_bytes"] = float(gen.kv_cache_bytes)
        metrics["kv_bytes_per_token"] = gen.kv_cache_bytes / gen.kv_cache_tokens
    return metrics


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


def rows_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["pass_index"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@dataclass
class Outcome:
    """What one job measured and made, whichever runner generated (layerbench or a peer)."""

    report: RunReport
    # Each sequence's prompt, new tokens and text (one sequence unless workload.batch_size > 1).
    prompts: list[list[int]]
    sequences: list[list[int]]
    token_times_s: list[float]  # the last measured repeat's
    texts: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    # The runner's own artifacts beyond the common ones (layerbench: its timeline), logged into a temp dir.
    log_extra: Callable[[Tracker, Path, str], None] | None = None
    profile_dir: Path | None = None  # bench.profile's trace and top ops


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
) -> RunReport | None:
    """Run one configuration end to end; the MLflow run ends FAILED with the reason if anything raises (KILLED
    when interrupted).

    None: a peer that cannot run here was skipped (`runner.skip_unavailable`), and no run was logged.
    `tracker`: the store, opened by the caller (the CLI opens it in a process of its own, early); by default
    this job opens it here when `tracking.enabled`.
    """
    console = console or Console()
    outputs_dir = Path(cfg.paths.outputs).resolve()
    peer = None
    if cfg.runner.name != "layerbench":
        from harness.peers.base import PEERS, RunnerUnavailable, explicit_families

        peer = PEERS[cfg.runner.name]
        try:
            # Before the run exists: a peer that cannot run these options logs nothing.
            if cfg.decoding.name != "greedy":
                raise RunnerUnavailable(
                    f"runner={peer.name} decodes greedily: decoding={cfg.decoding.name} is layerbench's runner's"
                )
            peer.check_installed()
            used = peer.choices(choices, explicit_families(overrides))
        except RunnerUnavailable as exc:
            if not cfg.runner.skip_unavailable:
                raise
            log.warning("skipped: %s", exc)
            console.print(Text(f"skipped: {exc}", style="yellow"))
            return None
        # A strategy family the peer has no counterpart for is none of its params.
        choices = {k: v for k, v in choices.items() if k not in strategies.FAMILIES} | used
        resolved = {k: v for k, v in resolved.items() if k not in strategies.FAMILIES}
    reset_peak_rss()  # the peak of this job, not of the sweep's jobs before it in this process
    if not cfg.tracking.enabled:
        tracker = None
    elif tracker is None:
        tracker = RunTracker(cfg.tracking.uri or default_tracking_uri(outputs_dir), cfg.tracking.experiment)
    if tracker is not None:
        # Named by the caller (the CLI: what the sweep varies); else by every choice.
        groups = ("model", "runner", "decoding", *strategies.FAMILIES)
        run_name = run_name or " ".join(f"{g}={choices[g]}" for g in groups if g in choices)
        tracker.start(
            run_name=run_name or "default",
            params=config_params(resolved, choices),
            # With the outputs folder: hw.disk names the disk the splits are read from.
            tags={**environment_tags(outputs_dir), "hydra.overrides": " ".join(overrides)},
            parent_run_id=parent_run_id,
        )
    profile_to = profile_dir(outputs_dir) if cfg.bench.profile else None
    try:
        device = resolve_device(cfg.device)
        if peer is None:
            outcome = stream_job(cfg, outputs_dir, device, console, profile_to)
        else:
            from harness.peers.job import run_peer

            outcome = run_peer(cfg, peer, choices, outputs_dir, device, console, profile_to)
        if profile_to is not None:
            outcome.profile_dir = profile_to
            outcome.tags["profile.dir"] = str(profile_to)
            console.print(Text(f"profile: {profile_to} (open trace.json.gz in ui.perfetto.dev)"))
        if cfg.model.weights_note:
            outcome.tags["model.weights"] = cfg.model.weights_note
        if tracker is not None:
            log_run(tracker, resolved, outcome, run_name or "default")
            tracker.end("FINISHED")
    except BaseException as exc:
        if tracker is not None:
            # Stopped from outside is KILLED: Ctrl-C, SIGTERM through harness.__main__, or the process made to exit
            # (a Ray worker whose sweep's driver is gone raises SystemExit in its task). Anything else is FAILED.
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
            tracker.end(status, reason=f"{type(exc).__name__}: {exc}".rstrip(": "))
        if profile_to is not None:
            with contextlib.suppress(OSError):  # only if empty: a job that failed after its profile keeps it
                profile_to.rmdir()
        raise
    print_summary(console, choices, outcome.report, outcome.texts[0])
    return outcome.report


def stream_job(
    cfg: Config, outputs_dir: Path, device: torch.device, console: Console, profile_to: Path | None = None
) -> Outcome:
    """layerbench's own runner: split, stream, measure, and compare with the floor and the references;
    `profile_to`: one generation more there, under torch.profiler."""
    if cfg.runner.cuda_graph and device.type != "cuda":
        raise ValueError(f"runner.cuda_graph=true needs a CUDA device: this run's is {device} (device={cfg.device})")
    # Before the cap and the peaks: building a generated checkpoint is no part of the run. On the GPU machine the
    # 8B geometry's weights are drawn on the device, 3.2 GB at once for its embedding, and its first job's peak
    # read 4.00 GB (of the 4 GiB cap) against 3.03 GB for the same job once the checkpoint existed.
    ckpt_dir = ensure_checkpoint(cfg.model, outputs_dir)
    with VramMonitor.from_config(device, cfg.vram) as vram:
        streamer = build_streamer(cfg, outputs_dir, device, vram, ckpt_dir)
        own_links, plan = {}, None
        if cfg.probe.enabled:
            own_links = kept_mapping_metrics(streamer, cfg)
            plan = make_plan(streamer, cfg, outputs_dir, own_links.get("kept_mapping_bytes_per_s"))
            console.print(Text(plan.describe(streamer.residency.bytes)))
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("generate", total=cfg.workload.max_new_tokens * cfg.bench.warmup)
            for _ in range(cfg.bench.warmup):
                generate(streamer, cfg, on_token=lambda _: progress.advance(task))
            gens, measured = [], []
            for repeat in range(cfg.bench.repeats):
                progress.reset(task, total=cfg.workload.max_new_tokens, description=f"generate {repeat + 1}")
                allocs, host = DeviceAllocs(device), HostLoad()

                def on_token(_: int, allocs: DeviceAllocs = allocs, host: HostLoad = host) -> None:
                    progress.advance(task)
                    allocs.token()
                    host.token()

                gens.append(generate(streamer, cfg, on_token=on_token))
                measured.append({**generation_metrics(streamer, gens[-1]), **allocs.metrics(), **host.metrics()})
            if profile_to is not None:
                progress.reset(task, total=cfg.workload.max_new_tokens, description="profile")
                record(lambda: generate(streamer, cfg, on_token=lambda _: progress.advance(task)), device, profile_to)
    vram.check()
    gen = gens[-1]
    report = RunReport().add(aggregate(measured))
    report.add(streamer.split_metrics())
    report.add(own_links)
    report.add(streamer.residency.metrics(streamer.config.num_hidden_layers))
    report.add(vram.metrics())
    if vram.enforced:  # beside the peaks: how close the estimate the cap was checked against came
        report.vram_estimate_bytes = float(streamer.planned_device_bytes)
    report.peak_rss_bytes = float(peak_rss_bytes())
    report.cache_bytes_held = float(streamer.pipeline.cache.bytes_held)
    tags: dict[str, str] = {}
    if plan is not None:
        report.plan_predicted_s = plan.predicted_s
        if report.tpot_s is not None and plan.predicted_s > 0:
            report.plan_ratio = report.tpot_s / plan.predicted_s
        tags["plan"] = plan.describe(streamer.residency.bytes)
    if cfg.probe.enabled:
        report.add(read_metrics(streamer, cfg, report))  # first: a cold run's disk floor uses its plain read
        floor, link_tags = floor_metrics(streamer, cfg, report, outputs_dir)
        report.add(floor)
        tags.update(link_tags)
    if cfg.reference.enabled:
        stop = eos_ids(streamer.config, streamer.tokenizer, streamer.ckpt_dir) if cfg.workload.stop_at_eos else []
        report.add(reference_metrics(
            streamer.ckpt_dir, stop, gen.prompts, gen.sequences, report.tpot_s,
            cfg.workload.max_new_tokens, device, streamer.runner.clock, cfg.bench.repeats,
        ))
    if streamer.draft is not None:
        report.spec_draft_bytes = float(streamer.draft.bytes)
        if plan is not None and report.spec_accepted_per_pass is not None:
            step = plan.predicted_s + cfg.decoding.k * report.spec_draft_step_s
            report.spec_predicted_s = step / (report.spec_accepted_per_pass + 1)
        tags["decoding.draft"] = streamer.draft.name
        tags["decoding.draft_form"] = "dequantized once" if streamer.draft.decoded_once else "stored, decoded per step"
    if cfg.quality.enabled and streamer.pipeline.codec.lossy:
        report.add(compression_quality(streamer, cfg, gen, outputs_dir))
    tags.update({
        "device": str(streamer.device),
        "split.dir": str(streamer.layout.dir),
        "split.fresh": str(streamer.split_stats.fresh).lower(),
        "cache.page_cache": cfg.cache.page_cache,
    })
    if streamer.residency.units:
        tags["residency.units"] = " ".join(streamer.residency.units)
    if (graphs := streamer.runner.graphs) is not None:
        report.graph_layers = float(len(graphs.graphs))
        if graphs.failed is not None:
            tags["warning.cuda_graph"] = graphs.failed
    if report.floor_s is not None:
        tags["floor.limiting"] = max(LINKS, key=lambda link: getattr(report, f"floor_{link}_s"))
    residual = report.crosscheck_residual
    if residual is not None and residual > CROSSCHECK_TOLERANCE:
        tags["warning.crosscheck"] = (
            f"stage times of a pass differ from its wall time by {residual:.1%} (> {CROSSCHECK_TOLERANCE:.0%})"
        )
        log.warning(tags["warning.crosscheck"])

    def log_timeline(tracker: Tracker, tmp: Path, title: str) -> None:
        rows = gen.timeline.rows(streamer.runner.stages)
        tracker.log_series("read_bytes", per_pass(rows, "read_bytes"))
        tracker.log_text(rows_csv(rows), "timeline.csv")
        # A pass from the middle (no prefill, no warm-up edge); passes, not tokens: a speculative pass yields several.
        decode_pass = len(gen.timeline.passes) // 2
        plot_pass(rows, decode_pass, tmp / "timeline_pass.png", f"{title}: pass {decode_pass}")
        tracker.log_artifact(tmp / "timeline_pass.png")

    texts = [streamer.tokenizer.decode(seq, skip_special_tokens=True) for seq in gen.sequences]
    return Outcome(report, gen.prompts, gen.sequences, gen.token_times_s, texts, tags, log_timeline)


def log_run(tracker: Tracker, resolved: Mapping[str, Any], outcome: Outcome, label: str) -> None:
    """Metrics, step series, tags and artifacts of a finished job."""
    report = outcome.report
    latencies = inter_token_latencies(outcome.token_times_s)
    tracker.log_metrics(report.metrics())
    # Step = the token's number (2..N), as in token_latency.png; timestamps = when each token arrived.
    to_epoch = time.time() - time.perf_counter()
    tracker.log_series(
        "token_latency_s", latencies, first_step=2, timestamps_s=[t + to_epoch for t in outcome.token_times_s[1:]]
    )
    tracker.log_dict(dict(resolved), "config.yaml")
    # The first sequence flat, as with one prompt; a batch adds every sequence beside it.
    generation: dict[str, Any] = {
        "prompt_ids": outcome.prompts[0], "generated_ids": outcome.sequences[0], "text": outcome.texts[0],
    }
    if len(outcome.sequences) > 1:
        generation["sequences"] = [
            {"prompt_ids": p, "generated_ids": g, "text": t}
            for p, g, t in zip(outcome.prompts, outcome.sequences, outcome.texts, strict=True)
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
        if outcome.log_extra is not None:
            outcome.log_extra(tracker, Path(tmp), label)
        if latencies:
            plot_token_latency(latencies, Path(tmp) / "token_latency.png", f"{label}: per-token latency")
            tracker.log_artifact(Path(tmp) / "token_latency.png")
    if outcome.profile_dir is not None:
        for path in sorted(outcome.profile_dir.iterdir()):
            tracker.log_artifact(path, "profile")
