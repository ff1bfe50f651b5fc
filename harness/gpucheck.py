"""`python -m harness.gpucheck OUTDIR`: the project's GPU check in one command, for a bare, offline GPU machine.

It runs from the source tree (no `pip install .`: the torch pin would fail there) and installs what the
GPU image lacks from the wheels it is given (`--wheels`, default `wheels/`: bitsandbytes, hydra-core,
omegaconf, antlr4-python3-runtime). MLflow may be absent: every run's report goes to
OUTDIR/gpucheck.json and the table to OUTDIR/gpucheck.md. Steps: the gpu-marked tests, a probe
refresh, an untimed warm-up job on the tiny model, the 8B-geometry synthetic model generated on the
GPU, cache=ram with compression none, 8bit and 4bit under the 4 GiB cap (prefetch on; 4bit also with
prefetch off and with residency=auto), and 4bit cache=disk with a cold page cache (also with
residency=auto), a few new tokens each. `--only` also reaches the diagnostic runs: bf16 and 8bit with
prefetch off, and 4-bit from RAM with prefetch varied one way each: prefetch depth 2, fixed allocator
segments, NVML read every 50 ms instead of 5, the prefetch worker sleeping, not spinning, in its waits,
each decoder layer's decode step as a CUDA graph (runner.cuda_graph), and the last two together.
`--only '=LABEL'` picks one run, `--repeat N` runs the picked ones N rounds round-robin. The prefetch
runs of 8bit and 4bit also leave a torch.profiler trace and their top ops in OUTDIR/profiles/; the probe
step also times what a 4-bit layer's decode costs the prefetch worker with its copy in flight
(`decode_waits`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What the GPU image lacks, as (import name, distribution to install from the wheels).
NEEDED = (("omegaconf", "omegaconf"), ("hydra", "hydra-core"), ("bitsandbytes", "bitsandbytes"))
# (label, overrides): the write-up's question on a real GPU, within a few minutes of device time.
RUNS = (
    ("bf16, ram, prefetch", ["cache=ram", "compression=none", "prefetch=on"]),
    ("8bit, ram, prefetch", ["cache=ram", "compression=8bit", "prefetch=on"]),
    # Prefetch off once, for 4-bit, whose compute the host's issue limits (1.68x its floor against 1.12x with
    # prefetch on, the third GPU run).
    ("4bit, ram", ["cache=ram", "compression=4bit"]),
    ("4bit, ram, prefetch", ["cache=ram", "compression=4bit", "prefetch=on"]),
    # The fastest the cap allows: what fits stays on the device (residency), the rest streams from RAM, overlapped.
    ("4bit, ram, prefetch, resident", ["cache=ram", "compression=4bit", "prefetch=on", "residency=auto"]),
    ("4bit, disk, cold", ["cache=disk", "compression=4bit", "cache.page_cache=cold"]),
    # The residency headline: most of the 8B's 4-bit layers fit the 4 GiB cap beside streaming the rest.
    ("4bit, disk, cold, resident", ["cache=disk", "compression=4bit", "cache.page_cache=cold", "residency=auto"]),
)
# Same-process A/Bs of open questions, beside the runs they vary: only when `--only` names them (`--only '4bit, ram'`
# takes them all), so that the default check stays within a few minutes of device time.
DIAGNOSTIC_RUNS = (
    # Prefetch off for bf16 and 8bit: 1.02x and 1.16x their floors on the H100 machine (third run), against 1.01x
    # and 1.06x with prefetch on. Out of the default check, whose nine runs were estimated at 5.0 minutes with them.
    ("bf16, ram", ["cache=ram", "compression=none"]),
    ("8bit, ram", ["cache=ram", "compression=8bit"]),
    # With fixed segments this one failed under the cap (32 MiB asked, 1.72 GiB reserved but unallocated); with the
    # allocator's expandable segments (vram.expandable_segments, on by default) it fits: 3.71 GB by NVML, third
    # run. The next row is the A/B of that default, in the same process.
    ("4bit, ram, prefetch, depth 2", ["cache=ram", "compression=4bit", "prefetch=on", "prefetch.depth=2"]),
    ("4bit, ram, prefetch, fixed segments",
     ["cache=ram", "compression=4bit", "prefetch=on", "vram.expandable_segments=false"]),
    # The VRAM peak sampler reads NVML's process list every 5 ms on a thread of its own, through the driver that
    # takes the compute's launches: the same run with readings every 50 ms, in the same process. Third run: no,
    # they do not make the 4-bit swing (1.15-1.50x at 50 ms against 1.12-1.65x at 5).
    ("4bit, ram, prefetch, NVML every 50 ms",
     ["cache=ram", "compression=4bit", "prefetch=on", "vram.sample_interval_s=0.05"]),
    # The prefetch worker spins on a core while it waits for the device (CUDA's default); here it sleeps instead.
    ("4bit, ram, prefetch, blocking wait",
     ["cache=ram", "compression=4bit", "prefetch=on", "prefetch.blocking_wait=true"]),
    # Each decoder layer's one-token step as a CUDA graph: one replay for its 55 eager ops. Captured at the first
    # decode pass, so after a warm-up generation (the graphs and the static cache outlive it).
    ("4bit, ram, prefetch, cuda graph",
     ["cache=ram", "compression=4bit", "prefetch=on", "runner.cuda_graph=true", "bench.warmup=1"]),
    # Both host-side cures at once: the graphs cut the compute's issue, the sleeping worker frees its core.
    ("4bit, ram, prefetch, cuda graph, blocking wait",
     ["cache=ram", "compression=4bit", "prefetch=on", "runner.cuda_graph=true", "bench.warmup=1",
      "prefetch.blocking_wait=true"]),
)
ALL_RUNS = RUNS + DIAGNOSTIC_RUNS
# Runs that also leave a torch.profiler trace and their top ops (bench.profile) in OUTDIR/profiles/<run>: where the
# host's time goes beside the copies (third run: the eager 4-bit compute's issue set the pace).
PROFILED = ("8bit, ram, prefetch", "4bit, ram, prefetch")
COLUMNS = (
    ("TTFT", "ttft_s"),
    ("per token", "tpot_s"),
    ("floor", "floor_s"),
    ("floor ratio", "floor_ratio"),
    ("peak VRAM (NVML)", "peak_vram_nvml_bytes"),
    # The estimate the cap and residency were planned with: tightening it waits on this against the peaks.
    ("VRAM estimate", "vram_estimate_bytes"),
    ("peak VRAM (allocated)", "peak_vram_allocated_bytes"),
    # Whether streamed weights reuse device memory: cudaMalloc calls a token after the first (item 2's slots),
    # and allocations that had to free every cached block under the cap first (each a device-wide wait).
    ("cudaMalloc / token", "device_allocs_per_token"),
    ("alloc retries / token", "device_alloc_retries_per_token"),
    ("layers resident", "resident_layers"),
    ("layers as CUDA graphs", "graph_layers"),
    ("predicted (plan)", "plan_predicted_s"),
    ("read / h2d / decode / compute", tuple(f"stage_{s}_share" for s in ("read", "h2d", "decode", "compute"))),
    # The 4-bit prefetch run's per token swung 0.095-0.177 s from job to job on an H100, all of it in compute,
    # with copies steady at link rate: the host issuing compute near compute's own time says launches set the pace.
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

log = logging.getLogger("harness.gpucheck")


def install_missing(wheels: Path) -> list[str]:
    """pip-install, offline from `wheels`, what this environment lacks; returns what was installed."""
    missing = [dist for module, dist in NEEDED if importlib.util.find_spec(module) is None]
    if missing:
        if not wheels.is_dir():
            raise SystemExit(f"missing {', '.join(missing)} and no wheel folder {wheels}: bring their wheels")
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *missing]
        subprocess.run(cmd, check=True)
    return missing


def run_gpu_tests(timeout_s: int = 180) -> str:
    """The gpu-marked tests; returns pytest's closing line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_probe.py", "tests/test_strategies.py", "tests/test_profile.py", "tests/test_graphs.py"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # a hung test is a finding: the runs still get the lease's time
        out = exc.stdout or b""  # bytes even with text=True, in some Pythons
        print((out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:])
        return f"the gpu tests did not finish in {timeout_s} s (killed)"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print(done.stdout[-4000:])
    return lines[-1] if lines else f"pytest exited {done.returncode} with no output: {done.stderr[-500:]}"


class RefusedOverrides(ValueError):
    pass


def composed(overrides: list[str]) -> tuple[Any, Any]:
    """One run's configuration, composed and validated as the job takes it (the DictConfig and the Config);
    refused with the reason."""
    from omegaconf import OmegaConf

    from harness.config import compose_config

    try:
        dcfg = compose_config(overrides)
        return dcfg, OmegaConf.to_object(dcfg)
    except Exception as exc:  # Hydra's and the schema's errors alike: the message names what is wrong
        raise RefusedOverrides(f"{type(exc).__name__}: {exc}") from exc


def run_one(overrides: list[str], configured: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """One job through the real config and job code, tracking off; its report, or why it failed. `configured`:
    `composed(overrides)`, when the caller already has it."""
    from omegaconf import OmegaConf

    from harness.job.run import run_job

    dcfg, cfg = configured or composed(overrides)
    groups = ("model", "cache", "compression", "residency")
    choices = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in groups)
    try:
        report = run_job(cfg, OmegaConf.to_container(dcfg, resolve=True), choices=choices, overrides=overrides)
    except Exception as exc:  # one configuration failing (the cap, say) is a finding, not the end of the check
        log.exception("run %s failed", overrides)
        return {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}"}
    return {"status": "FINISHED", "metrics": report.metrics()}


def picked_runs(only: tuple[str, ...], repeat: int = 1) -> list[tuple[str, list[str]]]:
    """The runs `--only` names, in the order asked (a word picks the runs whose label holds it, `=label` that run
    alone), or the default runs; `repeat` rounds of them, round-robin, so that a swing of the machine meets every
    run alike (rounds after the first are labelled `label #k`)."""
    def takes(word: str, label: str) -> bool:
        return word[1:] == label if word.startswith("=") else word in label

    picked = {label: overrides for word in only for label, overrides in ALL_RUNS if takes(word, label)}
    runs = list(picked.items()) if only else list(RUNS)
    return [(label if k == 1 else f"{label} #{k}", overrides)
            for k in range(1, repeat + 1) for label, overrides in runs]


def unknown_words(only: list[str]) -> list[str]:
    """The `--only` words that pick no run."""
    return [word for word in only if not picked_runs((word,))]


def slug(label: str) -> str:
    """A run's label as a folder name the device tool brings back (letters, digits, '-')."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")


def _compression(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("compression="))


def table(results: dict[str, dict[str, Any]], header: str) -> str:
    from harness.measurement.units import ABSENT, format_metric

    lines = [header, "", "| run | " + " | ".join(c for c, _ in COLUMNS) + " | status |",
             "|" + " --- |" * (len(COLUMNS) + 2)]
    for label, result in results.items():
        m = result.get("metrics", {})
        cells = []
        for _, name in COLUMNS:
            if isinstance(name, tuple):  # shares side by side
                cells.append(" / ".join(ABSENT if m.get(n) is None else f"{m[n]:.0%}" for n in name))
            else:
                cells.append(format_metric(name, m.get(name)))
        status = result["status"] if result["status"] == "FINISHED" else f"{result['status']}: {result['reason']}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {status} |")
    return "\n".join(lines) + "\n"


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
    import torch

    from harness.measurement.environment import environment_tags
    from harness.probe.gains import decode_waits, untried_gains
    from harness.probe.store import load_or_measure

    common = [
        f"model={model}", f"device={device}", f"paths.outputs={outputs}", f"workload.max_new_tokens={new_tokens}",
        "workload.prompt_tokens=8", "workload.stop_at_eos=false", "tracking.enabled=false",
        "quality.enabled=false", "reference.enabled=false", f"probe.size_mib={probe_mib}",
    ]
    if device == "cuda" and model != "tiny":
        common.append("model.generator_device=cuda")
    # The check writes each split itself, minutes before the runs that reuse it: re-hashing it for each of them
    # (split.verify, on by default) took 6.0-7.2 s a 4-bit run, 8.9 s an 8-bit and 16 s a bf16 one on an H100
    # machine (sha256 at about 1 GB/s), about 50 s of the default check. A reused file's size and header are
    # still checked.
    common.append("split.verify=false")
    # In the order asked for, so that what matters most runs first within a short lease.
    runs = picked_runs(only, repeat)
    # Every run's configuration, validated before the tests, the probe and the model's generation spend device
    # time: a bad override or model would otherwise fail each run, or end the check, minutes in.
    # Composed once: each run takes the configuration validated here.
    # PROFILED names round 1's labels: later rounds (`label #2`, ...) run without the profiler's extra generation.
    full = {label: [*common, *overrides, *(["bench.profile=true"] if label in PROFILED else []), *extra]
            for label, overrides in runs}
    configured = {label: composed(overrides) for label, overrides in full.items()}
    outdir.mkdir(parents=True, exist_ok=True)
    tags = environment_tags()  # the cores this process may use and their CPU quota, as a run's MLflow tags say them
    quota = tags.get("hw.cpu_quota_cores")
    summary: dict[str, Any] = {
        "device": device, "model": model, "torch": torch.__version__, "steps_s": {},
        "host": {"cpus": int(tags["hw.cpu_count"]), "cpu_quota_cores": None if quota is None else float(quota)},
    }
    if device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)

    def save(results: dict[str, dict[str, Any]]) -> None:
        (outdir / "gpucheck.json").write_text(json.dumps({**summary, "runs": results}, indent=1) + "\n")
        header = f"layerbench GPU check: {summary.get('gpu', device)}, {model}, {new_tokens} new tokens"
        (outdir / "gpucheck.md").write_text(table(results, header) + f"\n{json.dumps(summary)}\n")

    started = time.perf_counter()
    if tests:
        summary["gpu_tests"] = run_gpu_tests()
        summary["steps_s"]["tests"] = time.perf_counter() - started
    t = time.perf_counter()
    rates = load_or_measure(
        torch.device(device), outputs / "probe", outputs / "probe", refresh=True, size_bytes=probe_mib << 20
    )
    summary["link_rates"] = asdict(rates)
    summary["untried"] = untried_gains(
        torch.device(device), outputs / "probe", probe_mib << 20, rates.disk_read_cold_bytes_per_s
    )
    try:
        summary["decode_waits"] = decode_waits(torch.device(device), model)
    except Exception as exc:  # a measurement, never the end of the check
        log.exception("measuring the decode's waits failed")
        summary["decode_waits"] = {"failed": f"{type(exc).__name__}: {exc}"}
    summary["steps_s"]["probe"] = time.perf_counter() - t
    def splits_now() -> set[Path]:
        return set((outputs / "splits").glob("*/*"))  # <splits>/<checkpoint>-<hash>/<codec key>

    seen = splits_now()  # splits made before the check are never deleted
    # Untimed: the process's first job pays CUDA's and cuBLAS's warm-up and bitsandbytes' kernel loads (on an
    # H100, 4-bit from RAM measured 0.214 s a token as a process's first job, 0.186 s as its second).
    t = time.perf_counter()
    tiny = [o for o in common if not o.startswith(("model", "workload.max_new_tokens"))]
    warm = run_one([*tiny, "model=tiny", "compression=4bit", "workload.max_new_tokens=2", *extra])
    summary["warm_up"] = warm.get("reason", warm["status"])
    summary["steps_s"]["warm-up"] = time.perf_counter() - t
    for folder in splits_now() - seen:  # the warm-up's own
        shutil.rmtree(folder, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    made: dict[str, set[Path]] = {}  # compression -> the split folders this check made for it
    profiles = outputs / "profiles"
    for i, (label, overrides) in enumerate(runs):
        t = time.perf_counter()
        before = set(profiles.glob("*"))
        results[label] = run_one(full[label], configured[label])
        summary["steps_s"][label] = time.perf_counter() - t
        for folder in set(profiles.glob("*")) - before:  # one, from this run: kept beside the table
            kept = outdir / "profiles" / slug(label)
            shutil.rmtree(kept, ignore_errors=True)  # an earlier check's, into the same OUTDIR
            kept.parent.mkdir(exist_ok=True)
            results[label]["profile"] = str(shutil.move(folder, kept))
        save(results)
        compression = _compression(overrides)
        new = splits_now() - seen
        made.setdefault(compression, set()).update(new)
        seen |= new
        if not keep_splits and not any(_compression(o) == compression for _, o in runs[i + 1 :]):
            # The 8B geometry's bf16 checkpoint and its three splits would fill most of a 64 GiB disk.
            for folder in made.pop(compression):
                shutil.rmtree(folder, ignore_errors=True)
    summary["total_s"] = time.perf_counter() - started
    save(results)
    return {**summary, "runs": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpucheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheels to install offline")
    parser.add_argument("--model", default="llama3-8b-synthetic")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="checkpoints, splits, probe cache")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--keep-splits", action="store_true", help="keep each split (by default one is deleted "
                        "once no later run reads it, so the 8B's splits fit the GPU machine's disk)")
    parser.add_argument("--only", action="append", default=[], help="only the runs whose label holds this, in "
                        "the order given, or `=LABEL` that run alone; repeatable (--only '4bit, ram' --only 8bit)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the runs, round-robin (a swing of the "
                        "machine then meets each run alike); rounds after the first are labelled 'LABEL #k'")
    # default=[]: without one, argparse names this optional list among the arguments "required" when OUTDIR is missing
    parser.add_argument("overrides", nargs="*", default=[], help="more Hydra overrides for every run")
    # Intermixed: overrides may come after --only too (`OUT --only '4bit, ram' bench.profile=true`); plain parsing
    # took them for --only's and refused them as unrecognized, on a GPU machine where each try costs lease time.
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if unknown := unknown_words(args.only):
        labels = "; ".join(label for label, _ in ALL_RUNS)
        print(f"error: --only {unknown[0]!r} picks no run (a word in a label, or =LABEL): the runs are {labels}",
              file=sys.stderr)
        return 2
    if args.repeat < 1:
        print(f"error: --repeat {args.repeat}: the rounds of the runs must be 1 or more", file=sys.stderr)
        return 2
    if args.outdir.exists() and not args.outdir.is_dir():
        print(f"error: {args.outdir} is a file: OUTDIR is the folder the table and reports go to", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device: the GPU check runs on a GPU machine (torch sees none here)", file=sys.stderr)
        return 2
    installed = install_missing(args.wheels)
    if installed:
        log.info("installed from %s: %s", args.wheels, ", ".join(installed))
    try:
        summary = run_check(
            args.outdir.resolve(), device="cuda", model=args.model, new_tokens=args.new_tokens,
            outputs=args.outputs.resolve(), tests=not args.skip_tests, extra=args.overrides,
            keep_splits=args.keep_splits,
            only=tuple(args.only), repeat=args.repeat,
        )
    except RefusedOverrides as exc:
        print(f"error: a run's configuration is refused, before any step: {exc}", file=sys.stderr)
        return 2
    print((args.outdir / "gpucheck.md").read_text())
    return 0 if all(r["status"] == "FINISHED" for r in summary["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
