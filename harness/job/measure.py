"""The one measuring loop: any runner through warm-up, measured repeats, a profile, the reference and quality.

Every runner is timed, sampled and reported by the same code here: token timing, the host's load and the device
allocator per generation, the VRAM monitor around the whole, transformers' reference on the same prompts. The
runner adds only what it alone knows (`Runner.generation_metrics`, `annotate`, `quality_metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from harness.config import Config
from harness.job.reference import reference_metrics
from harness.measurement.energy import EnergyMeter, energy_counter
from harness.measurement.hostload import HostLoad
from harness.measurement.memory import peak_rss_bytes
from harness.measurement.metrics import aggregate, device_clock, inter_token_latencies, token_metrics
from harness.measurement.profile import record
from harness.measurement.run_report import RunReport
from harness.measurement.stats import interval_metrics, median_metrics
from harness.measurement.vram import DeviceAllocs, VramMonitor
from harness.runners.base import Runner
from harness.streaming.model import Generation
from harness.workload import Workload, prepare_workload


@dataclass
class Outcome:
    """What one job measured and made, whichever runner generated."""

    report: RunReport
    runner: Runner
    gen: Generation  # the last measured generation: its prompts, sequences and token times
    per_generation: list[dict[str, float]]  # each measured generation's own figures (the report holds their means)
    texts: list[str]  # each sequence's new tokens as text
    tags: dict[str, str] = field(default_factory=dict)
    profile_dir: Path | None = None  # bench.profile's trace and top ops


def measure(
    runner: Runner, cfg: Config, outputs_dir: Path, console: Console, profile_to: Path | None = None
) -> Outcome:
    """Load, warm up, measure `bench.repeats` generations (and one more under torch.profiler into `profile_to`),
    then compare with the references; the VRAM monitor watches it all."""
    device = runner.device
    # Before the monitor: building a generated checkpoint is no part of the run (it can take the device's memory).
    work: Workload = prepare_workload(cfg, outputs_dir)
    counter = energy_counter(device)  # or, where there is none, the reason
    with VramMonitor.from_config(device, cfg.vram) as vram:
        runner.load(work, vram, console)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("generate", total=cfg.workload.max_new_tokens)

            def run(description: str, on_token: Callable[[int], None] | None = None) -> Generation:
                progress.reset(task, total=cfg.workload.max_new_tokens, description=description)
                torch.manual_seed(cfg.workload.seed)  # a runner that samples through torch's global generator

                def advance(token: int) -> None:
                    progress.advance(task)
                    if on_token is not None:
                        on_token(token)

                return runner.generate(advance)

            warmups, started = 0, time.perf_counter()
            while cfg.bench.warms_up_more(warmups, time.perf_counter() - started):
                warmups += 1
                run(f"warm-up {warmups}")
            gens, measured = [], []
            for repeat in range(cfg.bench.repeats):
                allocs, host = DeviceAllocs(device), HostLoad()
                energy = EnergyMeter(None if isinstance(counter, str) else counter)

                def on_token(
                    _: int, allocs: DeviceAllocs = allocs, host: HostLoad = host, energy: EnergyMeter = energy
                ) -> None:
                    energy.token()
                    allocs.token()
                    host.token()

                energy.start()
                gen = run(f"generate {repeat + 1}", on_token)
                energy.end()
                gens.append(gen)
                measured.append({
                    **token_metrics(gen.start_s, gen.token_times_s, gen.sequences),
                    "prompt_tokens": float(len(gen.prompt_ids)),
                    **runner.generation_metrics(gen),
                    **allocs.metrics(),
                    **host.metrics(),
                    **energy.metrics(len(gen.token_times_s), gen.token_times_s[-1] - gen.start_s),
                })
            if profile_to is not None:  # one generation more, in no metric
                record(lambda: run("profile"), device, profile_to)
        runner.release()
    vram.check()
    gen = gens[-1]
    gaps = inter_token_latencies(gen.token_times_s)
    report = RunReport().add(aggregate(measured))
    report.add(interval_metrics(measured, gaps))
    report.add(median_metrics(measured))
    report.warmup_generations = float(warmups)
    report.add(vram.metrics())
    report.peak_rss_bytes = float(peak_rss_bytes())
    tags = {"device": str(device), "energy.source": counter if isinstance(counter, str) else counter.source}
    tags.update(runner.annotate(report, gen))
    if cfg.reference.enabled:
        reference, reference_tags = reference_metrics(
            work.ckpt_dir, work.stop, gen.prompts, gen.sequences, [m["tpot_s"] for m in measured if "tpot_s" in m],
            gaps, cfg.workload.max_new_tokens, device, device_clock(device), cfg.bench.repeats,
        )
        report.add(reference)
        tags.update(reference_tags)
    if cfg.quality.enabled:
        report.add(runner.quality_metrics(gen))
    texts = [work.tokenizer.decode(seq, skip_special_tokens=True) for seq in gen.sequences]
    return Outcome(report, runner, gen, measured, texts, tags)
