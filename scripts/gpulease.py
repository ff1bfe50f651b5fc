"""`python scripts/gpulease.py OUTDIR --budget-s 480`: layerbench beside accelerate and AirLLM on the 8B geometry,
and the 70B geometry, in one GPU lease (a bare, offline GPU machine: bring wheels, scripts/fetch_wheels.sh).

Every run is under the 4 GiB VRAM cap, 8 prompt tokens and `--new-tokens` (8) new, and is a preset,
conf/experiment/gpucheck/<name>.yaml (scripts/gpulease_plan.py lists them, most important first). Each run goes to a
worker process and is killed past its timeout; a run that would not fit the time left or the disk is skipped with
the reason, and the folders no later run reads are deleted as the lease goes. After every run the results are
rewritten in OUTDIR: `<date>-<machine>-gpulease.csv`, `.md` (one row per run) and `.json` (every run's report).
`--smoke` runs it all on the CPU with the tiny model (the 70B runs' generated straight into their splits).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # the scripts beside this file, however it is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpucheck_jobs import OPTIONAL, ROOT, RefusedOverrides, install_missing  # noqa: E402
from gpulease_plan import (  # noqa: E402
    ALL_RUNS,
    DISK_MARGIN_BYTES,
    MODELS,
    SETUP_S,
    SMOKE_MODEL,
    Planned,
    Resource,
    cannot_run_here,
    fallback_runs,
    free_bytes,
    make_room,
    options_of,
    picked_runs,
    plan_run,
    plan_runs,
    run_timeout_s,
)
from gpulease_results import Results  # noqa: E402
from gpulease_worker import Worker  # noqa: E402

log = logging.getLogger("gpulease")
GB = 1e9
# Seconds the worker may take to start and set up before the lease gives up on it.
SETUP_TIMEOUT_S = 600.0


def fallback_due(result: dict[str, Any]) -> bool:
    """Whether a run that has fallbacks should give way to them: it did not fit the time or the disk (skipped, timed
    out, or its own space check refused it), not merely could not run here."""
    reason = str(result.get("reason", ""))
    if result["status"] in ("SKIPPED", "TIMEOUT"):
        return reason.startswith(("time", "disk", "timed out"))
    return result["status"] == "FAILED" and "NotEnoughSpace" in reason


class Lease:
    """The lease's state between runs: the clock, what it made on disk, the references, the results."""

    def __init__(self, *, device: str, budget_s: float, outputs: Path, keep: bool, clock: Callable[[], float],
                 started: float, results: Results, worker: Worker, run_timeout_cap_s: float | None,
                 probe_mib: int) -> None:
        self.device, self.budget_s, self.outputs, self.keep = device, budget_s, outputs, keep
        self.clock, self.started, self.results, self.worker = clock, started, results, worker
        self.run_timeout_cap_s, self.probe_mib = run_timeout_cap_s, probe_mib
        self.made: dict[str, Resource] = {}  # folders this lease wrote, by resource key (the others are never deleted)
        self.existing: set[str] = set()  # resource keys present before the lease
        self.references: dict[str, list[int] | str] = {}  # transformers' tokens, or why none, by checkpoint
        self.needs_setup = True

    def remaining_s(self) -> float:
        return self.budget_s - (self.clock() - self.started)

    def setup(self, refresh: bool) -> None:
        """The worker's setup (`gpulease_worker.setup`); the first one's facts go with the results."""
        timeout = max(min(SETUP_TIMEOUT_S, self.remaining_s()), 1.0)
        reply = self.worker.ask("setup", timeout, device=self.device, outputs=str(self.outputs),
                                probe_mib=self.probe_mib, refresh=refresh, warm_up=True)
        if reply is None:
            reply = {"setup_failed": f"timed out: the worker did not set up in {timeout:.0f} s"}
        elif reply.get("status") == "FAILED":
            reply = {"setup_failed": reply["reason"]}
        if not self.results.facts:
            self.results.facts = {"device": self.device, **reply}
        self.needs_setup = False

    def forget_missing(self) -> None:
        """Drops what a killed or failed run left half written, or what a run deleted, from the lease's list."""
        self.made = {key: r for key, r in self.made.items() if r.present()}

    def clean_up(self, later: list[Planned]) -> None:
        """Deletes the folders this lease made that no later run reads."""
        if self.keep:
            return
        wanted = {r.key for p in later for r in p.resources}
        for key in [k for k in self.made if k not in wanted]:
            log.info("deleting %s: no later run reads it", key)
            self.made.pop(key).remove()

    def decide(self, planned: Planned, later: list[Planned]) -> tuple[str, str] | None:
        """(status, reason) for a run that is not made, or None to make it."""
        if reason := cannot_run_here(planned):
            return "SKIPPED", reason
        estimate = planned.estimate_s(self.reference_due(planned))
        if estimate > (left := self.remaining_s()):
            return "SKIPPED", f"time (needs ~{estimate:.0f} s, {max(left, 0):.0f} s left)"
        need, free = planned.need_bytes(), free_bytes(self.outputs)
        mine = {r.key for r in planned.resources}
        spare = [r for key, r in self.made.items() if key not in mine and not self.keep]
        for resource in make_room(need, free, spare, later):
            log.info("deleting %s to make room for %s (a later run rebuilds it)", resource.key, planned.run.label)
            self.made.pop(resource.key).remove()
        free = free_bytes(self.outputs)
        if need + DISK_MARGIN_BYTES > free:
            spare = DISK_MARGIN_BYTES / GB
            return "SKIPPED", f"disk (needs {need / GB:.1f} GB + {spare:.1f} GB spare, {free / GB:.1f} GB free)"
        return None

    def reference_due(self, planned: Planned) -> bool:
        return planned.has_weights and planned.model_key not in self.references

    def agreement(self, planned: Planned, reply: dict[str, Any]) -> tuple[float | None, str]:
        """The run's greedy tokens against transformers' for the same checkpoint, or why there is none."""
        from harness.job.reference import agreement

        if not planned.has_weights:
            return None, "agreement n/a: the model is generated straight into its splits (no checkpoint weights)"
        if "reference_ids" in reply:
            self.references[planned.model_key] = reply["reference_ids"]
        elif "reference_s" in reply and planned.model_key not in self.references:  # tried, and failed
            self.references[planned.model_key] = reply["reference_failed"]
        ref = self.references.get(planned.model_key)
        if "generated_ids" not in reply or not isinstance(ref, list):
            return None, f"agreement n/a: {reply.get('reference_failed') or ref or 'no reference'}"
        return agreement([reply["generated_ids"]], [ref]), ""

    def make(self, planned: Planned) -> dict[str, Any]:
        """Runs one planned run in the worker (a fresh worker set up first, the probe read from its cache); its
        outcome, for the run's row."""
        if self.needs_setup:
            self.setup(refresh=False)
        left = self.remaining_s()
        estimate = planned.estimate_s(self.reference_due(planned))
        timeout = run_timeout_s(estimate, left, self.run_timeout_cap_s)
        before = {r.key for r in planned.resources if r.present()}
        started = self.clock()
        reply = self.worker.ask("run", timeout, overrides=planned.overrides, outputs=str(self.outputs),
                                direct=planned.direct, reference=self.reference_due(planned))
        elapsed = self.clock() - started
        for resource in planned.resources:
            if resource.key not in before and resource.key not in self.existing:
                self.made[resource.key] = resource
        if reply is None:
            self.needs_setup = True
            reply = {"status": "TIMEOUT", "reason": f"timed out: killed after {timeout:.0f} s"}
        elif not self.worker.alive:
            self.needs_setup = True
        self.forget_missing()
        agreement, note = self.agreement(planned, reply) if reply["status"] == "FINISHED" else (None, "")
        return {"reply": reply, "elapsed_s": elapsed, "estimate_s": estimate, "agreement": agreement, "note": note}


def row_values(planned: Planned, new_tokens: int) -> dict[str, Any]:
    """A run's row before it runs: what it is."""
    cfg = planned.cfg
    options = options_of(planned)
    return {
        "device": cfg.device, "model": cfg.model.name, "runner": cfg.runner.name,
        **{k: options[k] for k in ("cache", "page_cache", "compression", "prefetch", "residency", "kv_cache",
                                   "cuda_graph")},
        "prompt_tokens": cfg.workload.prompt_tokens, "new_tokens": new_tokens, "vram_cap_gib": cfg.vram.cap_gib,
        "preset": planned.run.preset, "note": planned.note, "status": "pending",
    }


def run_lease(
    outdir: Path, *, smoke: bool, models: dict[str, str], new_tokens: int, budget_s: float, outputs: Path,
    only: tuple[str, ...] = (), extra: list[str] | None = None, keep: bool = False, probe_mib: int = 256,
    run_timeout_cap_s: float | None = None, clock: Callable[[], float] = time.monotonic,
    started: float | None = None, worker: Worker | None = None,
) -> Results:
    """Every picked run, in order, under the budget; the results rewritten after each. `started`: the clock's reading
    the budget counts from (the script's start)."""
    device, extra = ("cpu" if smoke else "cuda"), list(extra or [])
    started = clock() if started is None else started

    def planned_run(run: Any, note: str = "") -> Planned:
        return plan_run(run, device=device, models=models, new_tokens=new_tokens, outputs=outputs, extra=extra,
                        smoke=smoke, note=note)

    # Every run's configuration, and its fallbacks', refused before any device time is spent.
    queue = plan_runs(picked_runs(only), device=device, models=models, new_tokens=new_tokens, outputs=outputs,
                      extra=extra, smoke=smoke)
    for planned in queue:
        for fallback in fallback_runs(planned.run):
            planned_run(fallback)
    header = {"device": device, "budget_s": budget_s, "new_tokens": new_tokens, "smoke": smoke,
              "prompt_tokens": queue[0].cfg.workload.prompt_tokens if queue else None,
              "vram_cap_gib": queue[0].cfg.vram.cap_gib if queue else None, "models": models}
    results = Results(outdir, header)
    lease = Lease(device=device, budget_s=budget_s, outputs=outputs, keep=keep, clock=clock,
                  started=started, results=results, worker=worker or Worker(), run_timeout_cap_s=run_timeout_cap_s,
                  probe_mib=probe_mib)
    lease.existing = {r.key for p in queue for r in p.resources if r.present()}
    try:
        lease.setup(refresh=True)
        for planned in queue:
            results.set(planned.run.label, **row_values(planned, new_tokens))
        results.save()
        while queue:
            planned = queue.pop(0)
            label = planned.run.label
            results.set(label, **row_values(planned, new_tokens))
            if decided := lease.decide(planned, queue):
                outcome: dict[str, Any] = {"reply": {"status": decided[0], "reason": decided[1]}, "elapsed_s": 0.0,
                                           "estimate_s": planned.estimate_s(lease.reference_due(planned)),
                                           "agreement": None, "note": ""}
            else:
                results.set(label, status="running")
                results.save()
                outcome = lease.make(planned)
            reply = outcome["reply"]
            metrics = reply.get("metrics", {})
            results.reports[label] = reply
            note = "; ".join(n for n in (planned.note, outcome["note"]) if n)
            results.set(label, status=reply["status"], reason=reply.get("reason", ""), note=note,
                        estimate_s=round(outcome["estimate_s"], 1), elapsed_s=round(outcome["elapsed_s"], 1),
                        agreement_vs_transformers=outcome["agreement"],
                        **{k: metrics.get(k) for k in ("tpot_s", "ttft_s", "floor_s", "floor_ratio",
                                                       "peak_vram_nvml_bytes", "load_s", "resident_layers")})
            if fallback_due(reply) and (instead := fallback_runs(planned.run)):
                why = f"in place of '{label}', which was {reply['status'].lower()}: {reply['reason']}"
                added = [planned_run(run, note=why) for run in instead]
                queue[:0] = added
                for extra_run in added:
                    results.set(extra_run.run.label, **row_values(extra_run, new_tokens))
                results.place_after(label, [run.run.label for run in added])
            lease.clean_up(queue)
            results.save()
    finally:
        lease.worker.close()
        if not keep:
            lease.clean_up([])
    results.header["total_s"] = round(clock() - started, 1)
    results.save()
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/gpulease.py", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="where the CSV, the table and the JSON go")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything, setup included (480)")
    p.add_argument("--new-tokens", type=int, default=8, help="new tokens per run (8)")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheels to install offline (wheels/)")
    p.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="checkpoints, splits, probe cache")
    p.add_argument("--smoke", action="store_true", help="on the CPU, every geometry as the tiny model")
    for size, model in MODELS.items():
        p.add_argument(f"--model-{size.lower()}", default=None, help=f"the model of the {size} runs ({model})")
    p.add_argument("--only", action="append", default=[], help="only the runs whose label holds this, in the order "
                   "given, or `=LABEL` that run alone; repeatable (--only 8B --only 70B)")
    p.add_argument("--run-timeout-s", type=float, default=None, help="the longest any one run may take")
    p.add_argument("--keep", action="store_true", help="delete nothing the lease made")
    p.add_argument("--probe-mib", type=int, default=256, help="bytes per link measurement (256 MiB)")
    p.add_argument("overrides", nargs="*", default=[], help="more Hydra overrides for every run")
    return p


def refusal(args: argparse.Namespace) -> str | None:
    """Why the command line is refused before anything runs, or None."""
    if unknown := [word for word in args.only if not picked_runs((word,))]:
        labels = "; ".join(run.label for run in ALL_RUNS)
        return f"--only {unknown[0]!r} picks no run (a word in a label, or =LABEL): the runs are {labels}"
    if args.budget_s <= SETUP_S:
        return f"--budget-s {args.budget_s:g}: the setup alone takes about {SETUP_S:g} s; give more"
    if args.new_tokens < 1:
        return f"--new-tokens {args.new_tokens}: each run generates 1 new token or more (the issue asks 8)"
    if args.run_timeout_s is not None and args.run_timeout_s <= 0:
        return f"--run-timeout-s {args.run_timeout_s:g}: a run's timeout must be positive"
    if args.probe_mib < 1:
        return f"--probe-mib {args.probe_mib}: the probe moves 1 MiB or more"
    if args.outdir.exists() and not args.outdir.is_dir():
        return f"{args.outdir} is a file: OUTDIR is the folder the results go to"
    import torch

    if not args.smoke and not torch.cuda.is_available():
        return "no CUDA device: the lease runs on a GPU machine (torch sees none here); --smoke runs it on the CPU"
    return None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if reason := refusal(args):
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if installed := install_missing(args.wheels, OPTIONAL):
        log.info("installed from %s: %s", args.wheels, ", ".join(installed))
    models = {size: getattr(args, f"model_{size.lower()}") or (SMOKE_MODEL if args.smoke else model)
              for size, model in MODELS.items()}
    try:
        results = run_lease(
            args.outdir.resolve(), smoke=args.smoke, models=models, new_tokens=args.new_tokens,
            budget_s=args.budget_s, outputs=args.outputs.resolve(), only=tuple(args.only), extra=args.overrides,
            keep=args.keep, probe_mib=16 if args.smoke and args.probe_mib == 256 else args.probe_mib,
            run_timeout_cap_s=args.run_timeout_s, started=started,
        )
    except RefusedOverrides as exc:
        print(f"error: a run's configuration is refused, before any step: {exc}", file=sys.stderr)
        return 2
    paths = results.save()
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(row["status"] in ("FINISHED", "SKIPPED") for row in results.rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
