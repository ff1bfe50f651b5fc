"""runner.cuda_graph on the CPU: every static buffer, the StaticCache and the capture-then-replay order, with the
graph itself stood in for by a replay that reruns the captured step (CUDA graphs exist on CUDA only; the gpu test
below replays real ones)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers_reference import TOLERANCE, reference_generate

from harness.job.run import run_job
from harness.runners.layerbench.setup import build_setup, generate
from harness.streaming.graphs import CudaGraphReplay, DecodeGraphs
from harness.streaming.model import forward_decoder

NEW_TOKENS = 8


class RerunReplay:
    """A graph's stand-in: capture keeps the step without running it, as a CUDA capture does; replay reruns it."""

    def __init__(self, pool: object) -> None:
        self.step: Callable[[], None] | None = None
        self.replays = 0

    def capture(self, step: Callable[[], None]) -> None:
        self.step = step

    def replay(self) -> None:
        self.replays += 1
        self.step()


@pytest.mark.parametrize("extra", [[], ["model.dtype=float32"], ["prefetch=on", "compression=4bit", "cache=disk"]])
def test_decode_passes_replay_each_layers_step_as_transformers_static_generate(make_cfg, extra: list[str]) -> None:
    cfg = make_cfg("runner.cuda_graph=true", f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false",
                   *extra)
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    graphs = setup.model.graphs = DecodeGraphs(forward_decoder, make_replay=RerunReplay)
    first = generate(setup, cfg, keep_logits=True)
    layers = setup.config.num_hidden_layers
    assert graphs.failed is None and sorted(graphs.graphs) == list(range(layers))
    # The first decode pass ran eagerly and captured; the other passes replayed.
    assert [g.replays for g in graphs.graphs.values()] == [NEW_TOKENS - 2] * layers
    again = generate(setup, cfg, keep_logits=True)  # the same cache, reset: the graphs replay from its start
    assert again.generated_ids == first.generated_ids
    assert all(torch.equal(a, b) for a, b in zip(again.logits, first.logits, strict=True))
    assert [g.replays for g in graphs.graphs.values()] == [2 * NEW_TOKENS - 3] * layers
    if "compression=4bit" in extra:  # lossy: transformers' reference would run the uncompressed weights
        return
    ref_ids, ref_logits = reference_generate(setup.ckpt_dir, first.prompt_ids, NEW_TOKENS, "static")
    assert first.generated_ids == ref_ids
    dtype = torch.float32 if "model.dtype=float32" in extra else torch.bfloat16
    for step, (ours, ref) in enumerate(zip(first.logits, ref_logits, strict=True)):
        err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        assert err <= TOLERANCE[dtype] * max(scale, 1.0), f"step {step}: max |diff| {err}"


def test_a_capture_that_fails_leaves_the_run_eager_with_the_reason(make_cfg) -> None:
    class Refused(RerunReplay):
        def capture(self, step: Callable[[], None]) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    cfg = make_cfg("runner.cuda_graph=true", f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    graphs = setup.model.graphs = DecodeGraphs(forward_decoder, make_replay=Refused)
    graphed = generate(setup, cfg, keep_logits=True)
    assert graphs.graphs == {} and "capturing layer 0: RuntimeError: operation not permitted" in graphs.failed
    plain = make_cfg(f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false")
    eager = generate(build_setup(plain, Path(plain.paths.outputs), torch.device("cpu")), plain, keep_logits=True)
    assert graphed.generated_ids == eager.generated_ids


def test_another_length_gets_a_new_cache_and_new_graphs(make_cfg) -> None:
    cfg = make_cfg("runner.cuda_graph=true", "workload.max_new_tokens=4", "workload.stop_at_eos=false")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    graphs = setup.model.graphs = DecodeGraphs(forward_decoder, make_replay=RerunReplay)
    generate(setup, cfg)
    cache, captured = graphs._cache, dict(graphs.graphs)
    cfg.workload.max_new_tokens = 6
    generate(setup, cfg)
    assert graphs._cache is not cache, "a longer generation needs a longer static cache"
    assert all(graphs.graphs[i] is not captured[i] for i in captured), "graphs of the old cache are dropped"


@pytest.mark.parametrize(("overrides", "names"), [
    (["runner.cuda_graph=true", "kv_cache=offload"], "needs kv_cache=device and decoding=greedy"),
    (["runner.cuda_graph=true", "decoding=speculative"], "needs kv_cache=device and decoding=greedy"),
    (["runner.cuda_graph=true", "runner=transformers"], "runner.cuda_graph=true is layerbench's"),
])
def test_cuda_graph_refuses_what_it_cannot_replay(make_cfg, overrides: list[str], names: str) -> None:
    with pytest.raises(Exception, match=names):
        make_cfg(*overrides)


def test_cuda_graph_without_cuda_is_refused_before_any_work(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("runner.cuda_graph=true", f"paths.outputs={tmp_path}", "device=cpu")
    with pytest.raises(ValueError, match=r"runner.cuda_graph=true needs a CUDA device: this run's is cpu"):
        run_job(cfg, {}, choices={}, overrides=[])
    assert not (tmp_path / "checkpoints").exists(), "refused before the checkpoint is built"


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_cuda_graphs_replay_as_the_eager_static_cache_run(make_cfg, prefetch: str) -> None:
    """Real CUDA graphs against the same run with the graph stood in for: identical tokens and logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = torch.device("cuda")
    cfg = make_cfg("runner.cuda_graph=true", f"prefetch={prefetch}", "compression=4bit", "device=cuda",
                   f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false")
    runs = {}
    for replay in (RerunReplay, CudaGraphReplay):
        setup = build_setup(cfg, Path(cfg.paths.outputs), cuda)
        graphs = setup.model.graphs = DecodeGraphs(forward_decoder, make_replay=replay)
        generate(setup, cfg)  # the captures
        runs[replay] = generate(setup, cfg, keep_logits=True)
        assert graphs.failed is None, graphs.failed
    ours, stand_in = runs[CudaGraphReplay], runs[RerunReplay]
    assert ours.generated_ids == stand_in.generated_ids
    assert all(torch.allclose(a, b, atol=1e-3, rtol=0) for a, b in zip(ours.logits, stand_in.logits, strict=True))


@pytest.mark.gpu
def test_a_cuda_graph_job_reports_every_layer_replayed_as_a_graph(make_cfg) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    common = ["device=cuda", "compression=4bit", "prefetch=on", "bench.warmup=1", "workload.stop_at_eos=false",
              f"workload.max_new_tokens={NEW_TOKENS}"]
    graphed = run_job(make_cfg("runner.cuda_graph=true", *common), {}, choices={}, overrides=[])
    eager = run_job(make_cfg(*common), {}, choices={}, overrides=[])
    assert graphed.graph_layers == 4, "the tiny model's every decoder layer, none failed"
    assert eager.graph_layers is None
    assert graphed.new_tokens == eager.new_tokens == NEW_TOKENS
