"""`python scripts/gpucheck.py OUTDIR`: the project's GPU check in one command, for a bare, offline GPU machine.

It runs from the source tree and pip-installs, offline, what the GPU image lacks from `--wheels` (default
`wheels/`); the package itself never runs pip. Every run's report goes to OUTDIR/gpucheck.json and the table to
OUTDIR/gpucheck.md, both rewritten after each run. Steps: the gpu-marked tests, a probe refresh, an untimed warm-up
job on the tiny model, then the runs, all under the 4 GiB cap. Each run is a preset,
conf/experiment/gpucheck/<name>.yaml; `--only WORD` picks the runs whose label holds WORD (diagnostic ones
included), `--only '=LABEL'` one run, `--repeat N` N rounds of them, round-robin.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # gpucheck_jobs beside this file, however it is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpucheck_jobs import (  # noqa: E402  (the shared part of the GPU scripts; it puts the checkout on sys.path)
    PRESETS,
    ROOT,
    RefusedOverrides,
    choices,
    composed,
    install_missing,
    preset,
    run_one,
)

__all__ = ["PRESETS", "ROOT", "RefusedOverrides", "choices", "composed", "install_missing", "preset", "run_one"]

# (label, preset): the default runs, in the order they run, so that what matters most runs first when time is short.
RUNS = (
    ("bf16, ram, prefetch", "bf16_ram_prefetch"),
    ("8bit, ram, prefetch", "8bit_ram_prefetch"),
    ("4bit, ram", "4bit_ram"),
    ("4bit, ram, prefetch", "4bit_ram_prefetch"),
    ("4bit, ram, prefetch, resident", "4bit_ram_prefetch_resident"),
    ("4bit, disk, cold", "4bit_disk_cold"),
    ("4bit, disk, cold, resident", "4bit_disk_cold_resident"),
)
# Same-process A/Bs beside the runs they vary: only when `--only` names them (`--only '4bit, ram'` takes them all),
# so that the default check stays within a few minutes of device time.
DIAGNOSTIC_RUNS = (
    ("bf16, ram", "bf16_ram"),
    ("8bit, ram", "8bit_ram"),
    ("4bit, ram, prefetch, depth 2", "4bit_ram_prefetch_depth_2"),
    ("4bit, ram, prefetch, fixed segments", "4bit_ram_prefetch_fixed_segments"),
    ("4bit, ram, prefetch, NVML every 50 ms", "4bit_ram_prefetch_nvml_every_50_ms"),
    ("4bit, ram, prefetch, blocking wait", "4bit_ram_prefetch_blocking_wait"),
    ("4bit, ram, prefetch, cuda graph", "4bit_ram_prefetch_cuda_graph"),
    ("4bit, ram, prefetch, cuda graph, blocking wait", "4bit_ram_prefetch_cuda_graph_blocking_wait"),
)
ALL_RUNS = RUNS + DIAGNOSTIC_RUNS
# Runs that also record a generation with torch.profiler (bench.profile); round 1 only (not `label #2`, ...).
PROFILED = ("8bit, ram, prefetch", "4bit, ram, prefetch")
COLUMNS = (
    ("TTFT", "ttft_s"),
    ("per token", "tpot_s"),
    ("floor", "floor_s"),
    ("floor ratio", "floor_ratio"),
    ("energy / token, power", ("energy_per_token_j", "power_mean_w")),
    ("peak VRAM (NVML)", "peak_vram_nvml_bytes"),
    # The estimate the cap and residency are planned with, beside the peaks it is checked against.
    ("VRAM estimate", "vram_estimate_bytes"),
    ("peak VRAM (allocated)", "peak_vram_allocated_bytes"),
    # Whether streamed weights reuse device memory: cudaMalloc calls a token after the first, and allocations
    # that had to free every cached block under the cap first (each a device-wide wait).
    ("cudaMalloc / token", "device_allocs_per_token"),
    ("alloc retries / token", "device_alloc_retries_per_token"),
    ("layers resident", "resident_layers"),
    ("layers as CUDA graphs", "graph_layers"),
    ("predicted (plan)", "plan_predicted_s"),
    ("read / h2d / decode / compute", tuple(f"stage_{s}_share" for s in ("read", "h2d", "decode", "compute"))),
    # The compute's device time beside the host's time issuing it: close, and launches set the pace.
    ("compute / token", "stage_compute_s"),
    ("compute issue (host) / token", "compute_issue_s"),
    # The loads' Python, on the prefetch worker, shares the GIL with the compute's.
    ("load issue (host) / token", "load_issue_s"),
    ("NVML reading (mean)", "nvml_read_s"),
    ("NVML reading (slowest)", "nvml_read_max_s"),
    # A host held back (a CPU quota, a busy hypervisor) issues slowly: the process's CPU use, steal and throttling.
    ("host: CPU / steal / throttled", ("process_cpu_share", "host_steal_share", "cpu_throttled_share")),
    # The host's own speed: a fixed Python loop timed at each token (a slowed vCPU shows here, not as steal).
    ("host loop", "host_loop_s"),
)

log = logging.getLogger("gpucheck")


def run_gpu_tests(timeout_s: int = 180) -> str:
    """The gpu-marked tests, wherever they are (a module that cannot import here, MLflow's say, stops none of the
    others'); returns pytest's closing line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "tests"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # a hung test is a finding: the runs still get their time
        out = exc.stdout or b""  # bytes even with text=True, in some Pythons
        print((out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:])
        return f"the gpu tests did not finish in {timeout_s} s (killed)"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print(done.stdout[-4000:])
    return lines[-1] if lines else f"pytest exited {done.returncode} with no output: {done.stderr[-500:]}"


def picked_runs(only: tuple[str, ...], repeat: int = 1) -> list[tuple[str, str]]:
    """The (label, preset) runs `--only` names, in the order asked (a word picks the runs whose label holds it,
    `=label` that run alone), or the default runs; `repeat` rounds of them, round-robin, so that a swing of the
    machine meets every run alike (rounds after the first are labelled `label #k`)."""
    def takes(word: str, label: str) -> bool:
        return word[1:] == label if word.startswith("=") else word in label

    picked = {label: name for word in only for label, name in ALL_RUNS if takes(word, label)}
    runs = list(picked.items()) if only else list(RUNS)
    return [(label if k == 1 else f"{label} #{k}", name) for k in range(1, repeat + 1) for label, name in runs]


def unknown_words(only: list[str]) -> list[str]:
    """The `--only` words that pick no run."""
    return [word for word in only if not picked_runs((word,))]


def slug(label: str) -> str:
    """A run's label as a folder name the device tool brings back (letters, digits, '-')."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")


def table(results: dict[str, dict[str, Any]], header: str) -> str:
    """The runs as a Markdown table, one row each, with its status or failure reason."""
    from harness.measurement.units import ABSENT, format_metric

    lines = [header, "", "| run | " + " | ".join(c for c, _ in COLUMNS) + " | status |",
             "|" + " --- |" * (len(COLUMNS) + 2)]
    for label, result in results.items():
        m = result.get("metrics", {})
        cells = []
        for _, name in COLUMNS:
            if isinstance(name, tuple):  # figures side by side, shares as percentages
                cells.append(" / ".join(
                    ABSENT if m.get(n) is None else f"{m[n]:.0%}" if n.endswith("_share") else format_metric(n, m[n])
                    for n in name
                ))
            else:
                cells.append(format_metric(name, m.get(name)))
        status = result["status"] if result["status"] == "FINISHED" else f"{result['status']}: {result['reason']}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {status} |")
    return "\n".join(lines) + "\n"


def save(outdir: Path, summary: dict[str, Any], results: dict[str, dict[str, Any]], new_tokens: int) -> None:
    """gpucheck.json (the summary and every run's report) and gpucheck.md (the table, the summary below it)."""
    (outdir / "gpucheck.json").write_text(json.dumps({**summary, "runs": results}, indent=1) + "\n")
    machine = summary.get("gpu", summary["device"])
    header = f"layerbench GPU check: {machine}, {summary['model']}, {new_tokens} new tokens"
    (outdir / "gpucheck.md").write_text(table(results, header) + f"\n{json.dumps(summary)}\n")


def new_summary(device: str, model: str) -> dict[str, Any]:
    """The check's summary before any step: the machine, its cores and CPU quota, torch."""
    import torch

    from harness.measurement.environment import environment_tags

    tags = environment_tags()  # the cores this process may use and their CPU quota, as a run's MLflow tags say them
    quota = tags.get("hw.cpu_quota_cores")
    summary: dict[str, Any] = {
        "device": device, "model": model, "torch": torch.__version__, "steps_s": {},
        "host": {"cpus": int(tags["hw.cpu_count"]), "cpu_quota_cores": None if quota is None else float(quota)},
    }
    if device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)
    return summary


def probe(summary: dict[str, Any], device: str, model: str, outputs: Path, probe_mib: int) -> None:
    """The link probe, refreshed, and the unbuilt options' gains and the decode's waits into `summary`."""
    import torch

    from harness.probe.gains import decode_waits, untried_gains
    from harness.probe.store import load_or_measure

    dev, size = torch.device(device), probe_mib << 20
    rates = load_or_measure(dev, outputs / "probe", outputs / "probe", refresh=True, size_bytes=size)
    summary["link_rates"] = asdict(rates)
    summary["untried"] = untried_gains(dev, outputs / "probe", size, rates.disk_read_cold_bytes_per_s)
    try:
        summary["decode_waits"] = decode_waits(dev, model)
    except Exception as exc:  # a measurement, never the end of the check
        log.exception("measuring the decode's waits failed")
        summary["decode_waits"] = {"failed": f"{type(exc).__name__}: {exc}"}


def splits(outputs: Path) -> set[Path]:
    """The split folders under `outputs`: <splits>/<checkpoint>-<hash>/<codec key>."""
    return set((outputs / "splits").glob("*/*"))


def keep_profile(label: str, made: set[Path], outdir: Path) -> str | None:
    """Moves the profile folder a run made (one at most) beside the table, named for the run; where it went."""
    if not made:
        return None
    kept = outdir / "profiles" / slug(label)
    shutil.rmtree(kept, ignore_errors=True)  # an earlier check's, into the same OUTDIR
    kept.parent.mkdir(exist_ok=True)
    return str(shutil.move(next(iter(made)), kept))


def run_check(
    outdir: Path,
    *,
    device: str,
    model: str,
    new_tokens: int,
    outputs: Path,
    tests: bool,
    extra: list[str],
    probe_mib: int = 256,
    keep_splits: bool = False,
    only: tuple[str, ...] = (),
    repeat: int = 1,
) -> dict[str, Any]:
    """Every step; writes gpucheck.json and gpucheck.md into `outdir` as it goes, so a timeout keeps what ran."""
    machine = [f"device={device}", f"paths.outputs={outputs}", f"probe.size_mib={probe_mib}"]
    common = [*machine, f"model={model}", f"workload.max_new_tokens={new_tokens}"]
    if device == "cuda" and model != "tiny":
        common.append("model.generator_device=cuda")
    runs = picked_runs(only, repeat)
    # Every run's configuration, composed and validated before the tests, the probe and the model's generation
    # spend device time; each run takes the configuration validated here.
    full = {label: [*common, preset(name), *(["bench.profile=true"] if label in PROFILED else []), *extra]
            for label, name in runs}
    configured = {label: composed(overrides) for label, overrides in full.items()}
    outdir.mkdir(parents=True, exist_ok=True)
    summary = new_summary(device, model)
    started = time.perf_counter()
    if tests:
        summary["gpu_tests"] = run_gpu_tests()
        summary["steps_s"]["tests"] = time.perf_counter() - started
    t = time.perf_counter()
    probe(summary, device, model, outputs, probe_mib)
    summary["steps_s"]["probe"] = time.perf_counter() - t
    seen = splits(outputs)  # splits made before the check are never deleted
    # Untimed: the process's first job pays CUDA's and cuBLAS's warm-up and bitsandbytes' kernel loads.
    t = time.perf_counter()
    warm = run_one([*machine, preset("common"), "model=tiny", "compression=4bit", "workload.max_new_tokens=2", *extra])
    summary["warm_up"] = warm.get("reason", warm["status"])
    summary["steps_s"]["warm-up"] = time.perf_counter() - t
    for folder in splits(outputs) - seen:  # the warm-up's own
        shutil.rmtree(folder, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    # Each compression's runs still to come, and the split folders this check made for it.
    pending = Counter(cfg.compression.name for _, cfg in configured.values())
    made: dict[str, set[Path]] = {}
    profiles = outputs / "profiles"
    for label, _ in runs:
        t = time.perf_counter()
        before = set(profiles.glob("*"))
        results[label] = run_one(full[label], configured[label])
        summary["steps_s"][label] = time.perf_counter() - t
        if (kept := keep_profile(label, set(profiles.glob("*")) - before, outdir)) is not None:
            results[label]["profile"] = kept
        save(outdir, summary, results, new_tokens)
        compression = configured[label][1].compression.name
        new = splits(outputs) - seen
        made.setdefault(compression, set()).update(new)
        seen |= new
        pending[compression] -= 1
        if not keep_splits and not pending[compression]:
            # The 8B geometry's bf16 checkpoint and its three splits would fill most of a 64 GiB disk.
            for folder in made.pop(compression):
                shutil.rmtree(folder, ignore_errors=True)
    summary["total_s"] = time.perf_counter() - started
    save(outdir, summary, results, new_tokens)
    return {**summary, "runs": results}


def parser() -> argparse.ArgumentParser:
    """The command line: OUTDIR, the options, and Hydra overrides for every run, before or after the options."""
    p = argparse.ArgumentParser(prog="python scripts/gpucheck.py", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheels to install offline")
    p.add_argument("--model", default="llama3-8b-synthetic")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="checkpoints, splits, probe cache")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--keep-splits", action="store_true", help="keep each split (by default one is deleted once no "
                   "later run reads it, so that the 8B's splits fit a small disk)")
    p.add_argument("--only", action="append", default=[], help="only the runs whose label holds this, in the order "
                   "given, or `=LABEL` that run alone; repeatable (--only '4bit, ram' --only 8bit)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the runs, round-robin (a swing of the machine "
                   "then meets each run alike); rounds after the first are labelled 'LABEL #k'")
    # default=[]: without one, argparse names this optional list among the arguments "required" when OUTDIR is missing
    p.add_argument("overrides", nargs="*", default=[], help="more Hydra overrides for every run")
    return p


def refusal(args: argparse.Namespace) -> str | None:
    """Why the command line is refused before anything runs, or None."""
    if unknown := unknown_words(args.only):
        labels = "; ".join(label for label, _ in ALL_RUNS)
        return f"--only {unknown[0]!r} picks no run (a word in a label, or =LABEL): the runs are {labels}"
    if args.repeat < 1:
        return f"--repeat {args.repeat}: the rounds of the runs must be 1 or more"
    if args.outdir.exists() and not args.outdir.is_dir():
        return f"{args.outdir} is a file: OUTDIR is the folder the table and reports go to"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the GPU check runs on a GPU machine (torch sees none here)"
    return None


def main(argv: list[str] | None = None) -> int:
    # Intermixed: overrides may come after --only too (`OUT --only '4bit, ram' bench.profile=true`).
    args = parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if reason := refusal(args):
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if installed := install_missing(args.wheels):
        log.info("installed from %s: %s", args.wheels, ", ".join(installed))
    try:
        summary = run_check(
            args.outdir.resolve(), device="cuda", model=args.model, new_tokens=args.new_tokens,
            outputs=args.outputs.resolve(), tests=not args.skip_tests, extra=args.overrides,
            keep_splits=args.keep_splits, only=tuple(args.only), repeat=args.repeat,
        )
    except RefusedOverrides as exc:
        print(f"error: a run's configuration is refused, before any step: {exc}", file=sys.stderr)
        return 2
    print((args.outdir / "gpucheck.md").read_text())
    return 0 if all(r["status"] == "FINISHED" for r in summary["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
