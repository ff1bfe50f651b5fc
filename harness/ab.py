"""`python -m harness.ab --a 'OVERRIDES' --b 'OVERRIDES' [--rounds N] [COMMON OVERRIDES]`: an interleaved A/B.

Each round runs A's job and then B's, so that a slow spell of a shared machine meets both alike; each job is an
MLflow run of its own (tagged `ab.side`, `ab.round`) under one parent run. The rounds are the independent samples:
B over A of per-token time, TTFT and throughput, each with its 95% interval and verdict (harness.measurement.stats),
goes to the console, and the parent logs the per-token one as `ab_ratio`, `ab_ratio_ci95_low`/`_high` and the tag
`ab.verdict` (what it says of B). Both sides' configurations are composed and validated before the first job.

With `--a-rev`/`--b-rev` the sides are also two commits of layerbench (harness.checkouts): every job then runs as
`python -m harness` from its side's checkout (the current one for a side without a revision), in the same
environment otherwise, and is tagged with its commit (`ab.rev`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from harness.compose import compose_config, validated
from harness.config import GROUPS
from harness.measurement.run_report import CI_SUFFIXES, RunReport
from harness.measurement.stats import COMPARED, Ratio, ratio
from harness.measurement.units import format_metric, higher_is_better, sig3
from harness.signals import raise_on_sigterm

SIDES = ("A", "B")
# An interval over rounds needs two of them a side.
MIN_ROUNDS = 2

if TYPE_CHECKING:
    from harness.tracking.client import RunTracker



class AbError(RuntimeError):
    """An A/B that cannot go on, for a reason the user can act on."""


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="A's overrides, one string (e.g. 'kv_cache=device')")
    parser.add_argument("--b", required=True, help="B's overrides, one string (e.g. 'kv_cache=none')")
    parser.add_argument("--rounds", type=int, default=5, help=f"rounds of A then B (at least {MIN_ROUNDS})")
    parser.add_argument("--a-rev", help="run A's jobs with this commit of layerbench (a commit id, tag or branch)")
    parser.add_argument("--b-rev", help="run B's jobs with this commit of layerbench")
    parser.add_argument("overrides", nargs="*", default=[], help="overrides common to both (any job override)")
    return parser.parse_intermixed_args(argv)


def composed(side: str, own: str, overrides: list[str]) -> tuple[Any, Any]:
    """A side's configuration, as the job takes it; SystemExit naming the side, its own overrides (`own`) and the
    reason when it is refused."""

    try:
        dcfg = compose_config(overrides)
        return dcfg, validated(dcfg)
    except Exception as exc:  # Hydra's and the schema's errors alike name what is wrong
        raise SystemExit(f"error: side {side}'s configuration is refused ({side}: {own!r}): {exc}") from exc


def compare(reports: dict[str, list[RunReport]]) -> dict[str, Ratio | None]:
    """B over A of each compared figure, over the rounds."""
    out = {}
    for name in COMPARED:
        a, b = ([getattr(r, name) for r in reports[side] if getattr(r, name) is not None] for side in SIDES)
        out[name] = ratio(a, b, lower_is_better=not higher_is_better(name))
    return out


def table(reports: dict[str, list[RunReport]], ratios: dict[str, Ratio | None], title: str) -> Table:
    out = Table(title=f"{title}: each side's geometric mean over the rounds (what B / A compares); B over A, "
                      "its 95% interval and verdict",
                title_justify="left")
    for column in ("figure", "A", "B", "B / A", "95% interval", "verdict"):
        out.add_column(column, justify="left" if column == "figure" else "right", no_wrap=True)
    for name, found in ratios.items():
        if not any(getattr(r, name) is not None for side in SIDES for r in reports[side]):
            continue  # measured on neither side (energy without a counter)
        means = []
        for side in SIDES:
            values = [getattr(r, name) for r in reports[side] if getattr(r, name) is not None]
            means.append(format_metric(name, statistics.geometric_mean(values)) if values else "–")
        if found is None:
            out.add_row(name, *means, "–", "–", "–")
        else:
            interval = f"[{sig3(found.interval.low)}x, {sig3(found.interval.high)}x]"
            out.add_row(name, *means, f"{sig3(found.value)}x", interval, found.verdict)
    return out


def run_apart(folder: Path, overrides: list[str], parent: RunTracker, tags: dict[str, str]) -> RunReport:
    """One job as `python -m harness` from the checkout in `folder`, logged under `parent` and tagged; its figures
    read back from the store."""
    from harness.checkouts import CheckoutError, run_job_in

    started_ms = int(time.time() * 1000)
    try:
        run_job_in(folder, overrides)
    except CheckoutError as exc:
        raise AbError(str(exc)) from exc
    client = parent.client
    found = [r for r in client.search_runs([parent.experiment_id], f"attributes.start_time >= {started_ms}")
             if r.info.run_id != parent.run_id]
    if len(found) != 1:
        raise AbError(f"the job in {folder} left {len(found)} runs in the store, not one: run the A/B alone")
    run_id = found[0].info.run_id
    for key, value in {"mlflow.parentRunId": str(parent.run_id), **tags}.items():
        client.set_tag(run_id, key, value)
    return RunReport.from_metrics(client.get_run(run_id).data.metrics)


def run_ab(args: argparse.Namespace, console: Console) -> dict[str, Ratio | None]:
    from omegaconf import OmegaConf

    from harness.checkouts import ROOT, CheckoutError, checkouts, resolve
    from harness.job.run import run_job
    from harness.tracking.client import ROLE_TAG, RunTracker, default_tracking_uri

    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"error: --rounds {args.rounds}: an interval over rounds needs at least {MIN_ROUNDS}")
    sides = {"A": [*args.overrides, *shlex.split(args.a)], "B": [*args.overrides, *shlex.split(args.b)]}
    own = {"A": args.a, "B": args.b}
    configured = {side: composed(side, own[side], overrides) for side, overrides in sides.items()}
    cfg = configured["A"][1]
    try:
        commits = {side: resolve(rev) for side, rev in (("A", args.a_rev), ("B", args.b_rev)) if rev}
    except CheckoutError as exc:
        raise SystemExit(f"error: {exc}") from exc
    outputs = Path(cfg.paths.outputs).resolve()
    uri = cfg.tracking.uri or default_tracking_uri(outputs)
    if commits:
        if not cfg.tracking.enabled:
            raise SystemExit("error: --a-rev/--b-rev read each job's figures back from MLflow: drop "
                             "tracking.enabled=false")
        sides = {side: [*ov, f"tracking.uri={uri}", f"paths.outputs={outputs}"] for side, ov in sides.items()}
    parent = None
    if cfg.tracking.enabled:
        parent = RunTracker(uri, cfg.tracking.experiment)
        params = {"ab.a": args.a, "ab.b": args.b, "ab.rounds": args.rounds, "ab.common": " ".join(args.overrides),
                  **{f"ab.{side.lower()}_rev": commit for side, commit in commits.items()}}
        parent.start(run_name=f"ab: {args.a} vs {args.b}", params=params, tags={ROLE_TAG: "parent"})
    reports: dict[str, list[RunReport]] = {side: [] for side in SIDES}
    try:
        with checkouts(list(commits.values())) as folders:
            for round_ in range(1, args.rounds + 1):
                for side in SIDES:
                    console.print(f"[bold]round {round_} of {args.rounds}, {side}[/bold]: {' '.join(sides[side])}")
                    tags = {"ab.side": side, "ab.round": str(round_)}
                    if commits:  # every job apart, from its side's checkout: the process favours no side
                        tags |= {"ab.rev": commits.get(side, "this checkout"), "mlflow.runName": f"{side} #{round_}"}
                        folder = folders[commits[side]] if side in commits else ROOT
                        reports[side].append(run_apart(folder, sides[side], parent, tags))
                        continue
                    dcfg, side_cfg = configured[side]
                    report = run_job(
                        side_cfg, OmegaConf.to_container(dcfg, resolve=True),
                        choices={g: getattr(side_cfg, g).name for g in GROUPS}, overrides=sides[side],
                        parent_run_id=parent.run_id if parent is not None else None, run_name=f"{side} #{round_}",
                        console=console, tags=tags,
                    )
                    if report is None:
                        raise AbError(f"side {side}'s runner was skipped: it cannot run these options here")
                    reports[side].append(report)
        ratios = compare(reports)
        console.print(table(reports, ratios, f"B over A, {args.rounds} interleaved rounds"))
        if parent is not None:
            if (per_token := ratios["tpot_s"]) is not None:
                low, high = (f"ab_ratio{suffix}" for suffix in CI_SUFFIXES)
                parent.log_metrics({"ab_ratio": per_token.value, low: per_token.interval.low,
                                    high: per_token.interval.high})
                parent.set_tags({"ab.verdict": per_token.verdict})
            parent.end("FINISHED")
        return ratios
    except BaseException as exc:
        if parent is not None and not parent.ended:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"
            parent.end(status, reason=f"{type(exc).__name__}: {exc}".rstrip(": "))
        raise


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise_on_sigterm()  # killed, the parent and the running job close KILLED
    try:
        # Piped (a log, CI), rich would fold the table to 80 columns and cut the figures' names.
        run_ab(parse(argv), Console(highlight=False, width=None if sys.stdout.isatty() else 120))
    except AbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
