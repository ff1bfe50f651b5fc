"""The lease's jobs run in a worker process (scripts/gpulease.py), so that one that hangs can be killed.

The worker is started with `spawn` and keeps CUDA, cuBLAS and bitsandbytes warm from one job to the next; the lease
sends it one request at a time and waits for the reply no longer than that run's timeout, then kills it and starts
a fresh one for the next run. A request is `(op, kwargs)`: `setup` (the machine's facts, the link probe, an
untimed warm-up job) or `run` (one job, its generated tokens, and transformers' reference tokens when asked).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gpucheck_jobs import composed, preset, run_one
from gpulease_plan import direct_split

log = logging.getLogger("gpulease")

# Distributions whose versions go with the machine's facts.
VERSIONS = ("torch", "transformers", "accelerate", "bitsandbytes", "airllm")


def setup(device: str, outputs: str, probe_mib: int | None, refresh: bool, warm_up: bool) -> dict[str, Any]:
    """The machine's facts (GPU, versions, the measured host-to-device rate), the link probe measured (`refresh`) or
    read from its cache, and, with `warm_up`, an untimed job on the tiny model: a process's first job pays CUDA's
    and cuBLAS's start and bitsandbytes' kernel loads."""
    import platform

    import torch

    facts: dict[str, Any] = {"device": device, "python": platform.python_version()}
    for dist in VERSIONS:
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            facts[dist] = None
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    if probe_mib is not None:
        from dataclasses import asdict

        from harness.probe.store import load_or_measure

        probe_dir = Path(outputs) / "probe"
        try:
            rates = load_or_measure(torch.device(device), probe_dir, probe_dir, refresh=refresh,
                                    size_bytes=probe_mib << 20)
            facts["link_rates"] = asdict(rates)
            facts["h2d_pinned_bytes_per_s"] = rates.h2d_pinned_bytes_per_s
        except Exception as exc:  # a measurement, never the end of the lease: the floors go blank
            log.exception("the link probe failed")
            facts["probe_failed"] = f"{type(exc).__name__}: {exc}"
    if warm_up:
        machine = [f"device={device}", f"paths.outputs={outputs}"]
        if probe_mib is not None:
            machine.append(f"probe.size_mib={probe_mib}")
        warm = run_one([*machine, preset("common"), "model=tiny", "compression=4bit", "workload.max_new_tokens=2"])
        facts["warm_up"] = warm.get("reason", warm["status"])
    return facts


def generation_of(records: Path, before: set[Path]) -> dict[str, Any] | None:
    """The generated tokens a job logged to its record (generation.json), of the record folders made since
    `before`."""
    for folder in sorted(set(records.glob("*")) - before):
        for path in folder.rglob("generation.json"):
            return json.loads(path.read_text())
    return None


def reference_tokens(overrides: list[str], prompt_ids: list[int]) -> list[int]:
    """transformers' own greedy generate of the run's checkpoint, whole on the run's device, from the same prompt
    and for as many tokens (the cap is the streamed run's, and no longer holds)."""
    import torch

    from harness.checkpoints.generated import ensure_checkpoint
    from harness.device import resolve_device
    from harness.job.reference import time_transformers_generate
    from harness.measurement.metrics import device_clock

    _, cfg = composed(overrides)
    device = resolve_device(cfg.device)
    ckpt = ensure_checkpoint(cfg.model, Path(cfg.paths.outputs).resolve())
    try:
        sequences, _, _ = time_transformers_generate(
            ckpt, [prompt_ids], cfg.workload.max_new_tokens, [], device, device_clock(device)
        )
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return sequences[0]


def run(overrides: list[str], outputs: str, direct: bool, reference: bool) -> dict[str, Any]:
    """One job (`gpucheck_jobs.run_one`); its status, metrics and generated tokens, its seconds, and with
    `reference`, transformers' tokens for the same prompt (or why they could not be had)."""
    records = Path(outputs) / "records"
    before = set(records.glob("*"))
    started = time.perf_counter()
    with direct_split(direct):
        result = run_one(overrides)
    result["run_s"] = time.perf_counter() - started
    if result["status"] != "FINISHED":
        return result
    generation = generation_of(records, before)
    if generation is None:  # no tokens to compare: the reference is not worth its time
        result["reference_failed"] = "the job's record holds no generation.json"
        return result
    result["generated_ids"] = generation["generated_ids"]
    if reference:
        started = time.perf_counter()
        try:
            result["reference_ids"] = reference_tokens(overrides, generation["prompt_ids"])
        except Exception as exc:  # the reference is beside the run: the run's figures stand without it
            log.exception("transformers' reference failed")
            result["reference_failed"] = f"{type(exc).__name__}: {exc}"
        result["reference_s"] = time.perf_counter() - started
    return result


OPS = {"setup": setup, "run": run}


def serve(conn: Connection) -> None:
    """The worker's loop: each request's reply, or its failure, until `stop` or the lease's end of the pipe."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    while True:
        try:
            op, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        try:
            reply = OPS[op](**kwargs)
        except Exception as exc:  # a request that breaks is answered, so the lease goes on
            log.exception("%s failed", op)
            reply = {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


class Worker:
    """The lease's side of the worker process: started on the first request, killed when a reply is late."""

    def __init__(self) -> None:
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.started = 0  # processes started, the first included

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the lease's state, CUDA's none
        mine, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(theirs,), name="gpulease-worker", daemon=True)
        self.proc.start()
        theirs.close()
        self.conn = mine
        self.started += 1

    def ask(self, op: str, timeout_s: float, **kwargs: Any) -> dict[str, Any] | None:
        """The reply to one request; None when none came within `timeout_s` (the worker is then killed), and a
        failure naming the exit code when the worker died."""
        if not self.alive:
            self.start()
        assert self.conn is not None and self.proc is not None
        self.conn.send((op, kwargs))
        if self.conn.poll(max(timeout_s, 0.0)):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                code = self.proc.exitcode
                self.kill()
                return {"status": "FAILED", "reason": f"the worker process died (exit code {code})"}
        self.kill()
        return None

    def kill(self) -> None:
        """Ends the worker at once (its device memory goes with it); the next request starts a fresh one."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        """Asks the worker to stop, and kills it if it does not within 30 s."""
        if self.alive and self.conn is not None:
            try:
                self.conn.send(("stop", {}))
            except OSError:
                pass
            assert self.proc is not None
            self.proc.join(30)
        self.kill()
