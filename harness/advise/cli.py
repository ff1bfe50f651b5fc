"""The advisor's command: a Hydra app on the job's own conf/, so it takes every override a job takes (model,
vram.cap_gib, workload.*, tracking.*, hydra.*), plus the `advise.*` section (harness/config_planning.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import Progress

from harness.advise import quality, space, table, verify
from harness.allocator import host_malloc
from harness.compose import conf_dir, validated
from harness.config import Config


def refusal(cfg: Config, mode: RunMode) -> str | None:
    """What the command line asks that the advisor cannot do, before anything is measured."""
    if mode == RunMode.MULTIRUN:
        return "python -m harness.advise ranks one model, machine and cap: run it without -m (advise.verify sweeps)"
    if cfg.runner.name != "layerbench":
        return f"the advisor ranks layerbench's configurations: runner={cfg.runner.name} has none; leave runner out"
    if cfg.decoding.drafts:
        return "the advisor prices greedy decoding: a speculative run prices its round once its draft is built " \
            "(plan_predicted_s); leave decoding out"
    if not cfg.probe.enabled:
        return "the advisor prices configurations from this machine's probe: drop probe.enabled=false"
    if cfg.advise.verify and not cfg.tracking.enabled:
        return "advise.verify runs its picks as an MLflow sweep: drop tracking.enabled=false, or advise.verify"
    return None


def composer(overrides: Sequence[str], outputs: str) -> Callable[[dict[str, str]], Config]:
    """Compose the job's config with a configuration's choices in place of the command line's own for those
    groups, as `python -m harness` would."""
    from hydra import compose

    kept = space.job_overrides(overrides)

    def composed(choices: dict[str, str]) -> Config:
        dcfg = compose("config", overrides=[*kept, *space.overrides_for(choices)])
        dcfg.paths.outputs = outputs
        return validated(dcfg)

    return composed


def advise(cfg: Config, overrides: Sequence[str], job_dir: Path, console: Console) -> int:
    combos = space.space(cfg, overrides)
    refused: list[space.Refused] = []
    if cfg.advise.min_top1 is not None:
        combos, refused = quality.keep_above(cfg, combos, cfg.advise.min_top1, overrides)
    compose = composer(overrides, cfg.paths.outputs)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("pricing", total=len(combos))

        def step(index: int, choices: dict[str, str]) -> None:
            progress.update(task, completed=index, description=f"pricing {space.label(choices)}")

        priced, unfit = space.price_all(combos, compose, step)
    refused += unfit
    ranking = space.ranked(priced, cfg.advise.objective)
    title = (
        f"{cfg.model.name} under vram.cap_gib={cfg.vram.cap_gib}, batch {cfg.workload.batch_size}, "
        f"ranked by {cfg.advise.objective}: {len(ranking)} of {len(ranking) + len(refused)} fit"
    )
    rows = table.rows(ranking, cfg.advise.top)
    console.print(table.rich_table(title, rows))
    for line in table.refusals(refused):
        console.print(line, highlight=False, soft_wrap=True)
    all_rows = table.rows(ranking, len(ranking))
    (job_dir / "ranking.csv").write_text(table.csv_text(all_rows), encoding="utf-8")
    (job_dir / "ranking.md").write_text(f"# {title}\n\n" + table.markdown(all_rows), encoding="utf-8")
    console.print(f"ranking: {job_dir / 'ranking.csv'}", highlight=False)
    if not ranking:
        console.print("nothing fits: see the refusals above", highlight=False)
        return 1
    if cfg.advise.verify:
        return verified(cfg, overrides, ranking, job_dir, console)
    return 0


def verified(cfg: Config, overrides: Sequence[str], ranking: Sequence[space.Priced], job_dir: Path,
             console: Console) -> int:
    from harness.tracking.client import default_tracking_uri

    picks = space.verify_picks(len(ranking), space.seed_rank(ranking), cfg.advise.verify)
    presets = job_dir / "presets"
    names = verify.write_presets(presets, ranking, picks)
    sweep_dir = job_dir / "verify"
    console.print(f"verifying ranks {', '.join(str(i + 1) for i in picks)} as one sweep in {sweep_dir}",
                  highlight=False)
    status = verify.run_sweep(verify.sweep_command(overrides, names, presets, sweep_dir))
    uri = cfg.tracking.uri or default_tracking_uri(Path(cfg.paths.outputs))
    parent, results = verify.collect(uri, sweep_dir, ranking, picks, [job_dir / "ranking.csv", job_dir / "ranking.md"])
    rows = []
    for v in results:
        row = table.rows([v.priced], 1)[0]
        row.update(rank=v.rank, measured_s=v.measured_s,
                   ratio=None if v.measured_s is None else v.measured_s / v.priced.predicted_s)
        rows.append(row)
    shown = [{k: ("–" if v is None else v) for k, v in row.items()} for row in rows]
    console.print(table.markdown(shown, extra=("measured_s", "ratio")), highlight=False)
    (job_dir / "verify.md").write_text(table.markdown(shown, extra=("measured_s", "ratio")), encoding="utf-8")
    correlation = verify.spearman(results)
    if correlation is None:
        console.print("Spearman: fewer than three picks measured", highlight=False)
    else:
        rho, p = correlation
        console.print(f"Spearman rank correlation, predicted vs measured: {rho:.3f} (p={p:.3g})", highlight=False)
        if parent is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).log_metric(parent, "advise_spearman", rho)
    return status


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _app(dcfg: DictConfig) -> None:
    dcfg.paths.outputs = to_absolute_path(dcfg.paths.outputs)
    try:
        cfg = validated(dcfg)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    hydra_cfg = HydraConfig.get()
    if (problem := refusal(cfg, hydra_cfg.mode)) is not None:
        sys.exit(f"error: {problem}")
    console = Console()
    with host_malloc(cfg.bench.host_malloc):  # its probes measure as the jobs will run
        status = advise(cfg, list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir), console)
    if status:
        sys.exit(status)


def main() -> int:
    _app()
    return 0
