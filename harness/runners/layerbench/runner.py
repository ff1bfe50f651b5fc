"""runner=layerbench: the checkpoint split per layer and streamed through the device, as the strategy groups choose.

Beside its tokens it reports what only streaming has: the split, the plan it predicts before running, where each
pass's time goes (the timeline), the resident set, the per-token floor, speculative decoding's draft and what
compression costs in accuracy.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from harness.measurement.plots import plot_pass
from harness.measurement.timeline import CROSSCHECK_TOLERANCE, per_pass, stage_metrics
from harness.probe.floor import LINKS
from harness.runners.base import Runner
from harness.runners.layerbench.floor import check_floor, floor_metrics, kept_mapping_metrics, read_metrics
from harness.runners.layerbench.plan import Plan, check_plan, make_plan
from harness.runners.layerbench.quality import compression_quality, kv_quality
from harness.runners.layerbench.setup import Setup, build_setup, generate
from harness.streaming.model import Generation
from harness.workload import Workload

if TYPE_CHECKING:
    from harness.measurement.run_report import RunReport
    from harness.measurement.vram import VramMonitor
    from harness.tracking.process import Tracker

log = logging.getLogger(__name__)


def rows_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["pass_index"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class LayerbenchRunner(Runner):
    supports = None  # every option of every group

    def load(self, work: Workload, vram: VramMonitor, console: Console) -> None:
        cfg = self.cfg
        if cfg.runner.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"runner.cuda_graph=true needs a CUDA device: this run's is {self.device} (device={cfg.device})"
            )
        self.vram = vram
        self.setup: Setup = build_setup(cfg, self.outputs_dir, self.device, vram, work)
        self.own_links: dict[str, float] = {}
        self.plan: Plan | None = None
        if cfg.probe.enabled:
            self.own_links = kept_mapping_metrics(self.setup, cfg.cache)
            self.plan = make_plan(self.setup, cfg, self.probe_dir, self.own_links.get("kept_mapping_bytes_per_s"))
            console.print(Text(f"plan: {self.plan.describe(self.setup.residency.bytes)}"))

    def generate(self, on_token: Callable[[int], None] | None = None) -> Generation:
        return generate(self.setup, self.cfg, on_token=on_token)

    @property
    def probe_dir(self) -> Path:
        """Where the link probe's measurements are cached, per machine."""
        return self.outputs_dir / "probe"

    def generation_metrics(self, gen: Generation) -> dict[str, float]:
        """Bytes per pass, where each pass's time went, the cross-check, and what the KV cache held."""
        stages = self.setup.model.stages
        rows = gen.timeline.rows(stages)
        read_per_pass = per_pass(rows, "read_bytes")
        passes = len(read_per_pass)
        metrics = {
            "passes": float(passes),
            "read_bytes_per_pass": sum(read_per_pass) / passes,
            "read_bytes_first_pass": read_per_pass[0],
            "h2d_bytes_per_pass": sum(per_pass(rows, "h2d_bytes")) / passes,
            "decode_bytes_per_pass": sum(per_pass(rows, "decode_bytes")) / passes,
            **gen.metrics,
        }
        overlapped = self.setup.pipeline.prefetcher.layers_ahead > 0
        metrics.update(stage_metrics(rows, gen.timeline.pass_walls(stages), overlapped))
        if gen.kv_cache_bytes is not None:
            metrics["kv_cache_bytes"] = float(gen.kv_cache_bytes)
            if gen.kv_cache_tokens:
                metrics["kv_bytes_per_token"] = gen.kv_cache_bytes / gen.kv_cache_tokens
        return metrics

    def annotate(self, report: RunReport, gen: Generation) -> dict[str, str]:
        cfg, setup, plan = self.cfg, self.setup, self.plan
        report.add(setup.split_metrics())
        report.add(self.own_links)
        report.add(setup.residency.metrics(setup.config.num_hidden_layers))
        if self.vram.enforced:  # beside the peaks: how close the estimate the cap was checked against came
            report.vram_estimate_bytes = float(setup.planned_device_bytes)
        report.cache_bytes_held = float(setup.pipeline.cache.bytes_held)
        tags: dict[str, str] = {}
        if plan is not None:
            if plan.speculative is not None and plan.accepted_per_pass is None:  # none given: this run's
                plan.accepted_per_pass = report.spec_accepted_per_pass
                tags["plan.acceptance"] = "measured"
            report.plan_predicted_s = plan.predicted_s
            report.add(plan.terms())
            tpot_s = report.median("tpot_s")  # a typical generation's, as the plan predicts a typical pass
            if tpot_s is not None and plan.predicted_s > 0:
                report.plan_ratio = tpot_s / plan.predicted_s
            if (missed := check_plan(setup, cfg, tpot_s, plan.predicted_s, self.probe_dir)) is not None:
                tags["warning.plan"] = missed
                log.warning(missed)
            tags["plan"] = plan.describe(setup.residency.bytes)
        if cfg.probe.enabled:
            report.add(read_metrics(setup, cfg.cache, report))  # first: a cold run's disk floor uses its plain read
            floor, link_tags = floor_metrics(
                setup, cfg.probe, cfg.cache, cfg.workload.batch_size, report, self.probe_dir
            )
            report.add(floor)
            tags.update(link_tags)
            if (beaten := check_floor(setup, report, self.probe_dir)) is not None:
                tags["warning.floor"] = beaten
                log.warning(beaten)
        if (draft := setup.draft) is not None:
            report.spec_draft_bytes = float(draft.bytes)
            tags["decoding.draft"] = draft.name
            tags["decoding.draft_form"] = "dequantized once" if draft.decoded_once else "stored, decoded per step"
        tags.update({
            "split.dir": str(setup.layout.dir),
            "split.fresh": str(setup.split_stats.fresh).lower(),
            "cache.page_cache": cfg.cache.page_cache,
        })
        if setup.residency.units:
            tags["residency.units"] = " ".join(setup.residency.units)
        if (graphs := setup.model.graphs) is not None:
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
        return tags

    def quality_metrics(self, gen: Generation) -> dict[str, float]:
        metrics = {}
        if self.setup.pipeline.codec.lossy:
            metrics.update(compression_quality(self.setup, self.cfg, gen, self.outputs_dir))
        if self.cfg.kv_cache.lossy:
            metrics.update(kv_quality(self.setup, self.cfg))
        return metrics

    def log_artifacts(self, tracker: Tracker, tmp: Path, label: str, gen: Generation) -> None:
        rows = gen.timeline.rows(self.setup.model.stages)
        tracker.log_series("read_bytes", per_pass(rows, "read_bytes"))
        tracker.log_text(rows_csv(rows), "timeline.csv")
        # A pass from the middle (no prefill, no warm-up edge); passes, not tokens: a speculative pass yields several.
        decode_pass = len(gen.timeline.passes) // 2
        plot_pass(rows, decode_pass, tmp / "timeline_pass.png", f"{label}: pass {decode_pass}")
        tracker.log_artifact(tmp / "timeline_pass.png")
