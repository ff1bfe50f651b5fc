"""One peer's job: the same checkpoint, prompt ids, stopping rule and metrics code as layerbench's runner."""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoTokenizer

from harness.checkpoints.generated import ensure_checkpoint
from harness.config import Config
from harness.job.comparisons import reference_metrics
from harness.job.reference import generation_config, timed_generate
from harness.job.run import Outcome
from harness.job.streamer import batch_prompt_ids, check_context, eos_ids, load_model_config
from harness.measurement.hostload import HostLoad
from harness.measurement.memory import peak_rss_bytes
from harness.measurement.metrics import aggregate, device_clock, token_metrics
from harness.measurement.profile import record
from harness.measurement.run_report import RunReport
from harness.measurement.vram import VramMonitor, estimate_need_bytes
from harness.peers.base import LoadRequest, PeerSpec


def run_peer(
    cfg: Config,
    peer: PeerSpec,
    choices: Mapping[str, str],
    outputs_dir: Path,
    device: torch.device,
    console: Console,
    profile_to: Path | None = None,
) -> Outcome:
    ckpt_dir = ensure_checkpoint(cfg.model, outputs_dir)
    config = load_model_config(ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    prompts = batch_prompt_ids(tokenizer, cfg.workload)
    longest = max(len(p) for p in prompts)
    check_context(longest, cfg.workload.max_new_tokens, config, cfg.model.name)
    stop = eos_ids(config, tokenizer, ckpt_dir) if cfg.workload.stop_at_eos else []
    gen_cfg = generation_config(
        cfg.workload.max_new_tokens, stop, use_cache=choices.get("kv_cache") != "none", workload=cfg.workload
    )
    clock = device_clock(device)
    with VramMonitor.from_config(device, cfg.vram) as vram:
        budget = None
        if vram.enforced:
            # What the weights may take: the cap, less the CUDA context, the KV cache at the full length
            # and the activations (the same estimate layerbench's pre-check uses).
            need = estimate_need_bytes(
                config, stored_fraction=0.0, layers_ahead=0, kv_layers=config.num_hidden_layers,
                max_seq=longest + cfg.workload.max_new_tokens, batch=len(prompts),
            )
            budget = vram.cap_bytes - (vram.context_bytes or 0) - need["kv"] - need["activations"]
        request = LoadRequest(ckpt_dir, device, choices, budget, outputs_dir / "peers" / peer.name / ckpt_dir.name)
        start = time.perf_counter()
        model = peer.build().load(request)
        load_s = time.perf_counter() - start
        runs = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{peer.name} generate", total=cfg.workload.max_new_tokens)
            for repeat in range(cfg.bench.warmup + cfg.bench.repeats):
                progress.reset(task)
                torch.manual_seed(cfg.workload.seed)
                host = HostLoad()

                def on_token(_: int, host: HostLoad = host) -> None:
                    progress.advance(task)
                    host.token()

                run = timed_generate(model, prompts, gen_cfg, device, clock, on_token=on_token)
                if repeat >= cfg.bench.warmup:
                    runs.append((run, host.metrics()))
            if profile_to is not None:  # one generation more, in no metric (bench.profile)
                progress.reset(task)
                torch.manual_seed(cfg.workload.seed)
                record(partial(timed_generate, model, prompts, gen_cfg, device, clock), device, profile_to)
        del model
        gc.collect()
    vram.check()
    report = RunReport().add(
        aggregate([{**token_metrics(start_s, times, seqs), **host} for (seqs, start_s, times), host in runs])
    )
    report.prompt_tokens = float(len(prompts[0]))
    report.load_s = load_s
    report.add(vram.metrics())
    report.peak_rss_bytes = float(peak_rss_bytes())
    sequences, _, times = runs[-1][0]
    if cfg.reference.enabled:
        report.add(reference_metrics(
            ckpt_dir, stop, prompts, sequences, report.tpot_s, cfg.workload.max_new_tokens, device, clock,
            cfg.bench.repeats,
        ))
    texts = [tokenizer.decode(seq, skip_special_tokens=True) for seq in sequences]
    tags = {"device": str(device), "runner.work_dir": str(request.work_dir)}
    return Outcome(report, prompts, sequences, times, texts, tags)
