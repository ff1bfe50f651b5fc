"""Every cache x compression x prefetch x kv_cache combination against a transformers reference.

compression=none is compared with LlamaForCausalLM on the checkpoint; 8bit/4bit with
LlamaForCausalLM whose Linear weights were replaced by the same codec's dequantized
weights, so the only difference under test is where and how the codec runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig, LlamaForCausalLM

import strategies
from harness.job.run import run_job
from harness.measurement.vram import DeviceAllocs
from harness.runners.layerbench.setup import build_setup, generate
from harness.split.layout import unit_of
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig, CompressionConfig
from strategies.layer import DeviceLayer
from strategies.prefetch.configs import PrefetchOnConfig
from strategies.prefetch.on import INLINE_BELOW_S, PrefetchOn, _in_use_on

NEW_TOKENS = 12
PROMPT = "The history of computing began with"
MATRIX = list(
    itertools.product(["disk", "ram"], ["none", "8bit", "4bit"], ["off", "on"], ["none", "device", "offload"])
)
# Same weights and same modules: bf16 rounding differences only (see test_runner_reference).
LOGIT_TOLERANCE = 2e-2


CPU = torch.device("cpu")


def reference_model(
    ckpt: Path, compression: str, compress_embeddings: bool = False, device: torch.device = CPU
) -> LlamaForCausalLM:
    """transformers' model with the weights the runner computes with: encoded on `device`, as the split was
    (bitsandbytes' CPU and CUDA quantizers can round a value to different codes)."""
    model = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    if compression == "none":
        return model
    cfg = {"8bit": Blockwise8bitConfig, "4bit": Blockwise4bitConfig}[compression](
        compress_embeddings=compress_embeddings
    )
    codec = strategies.build(cfg)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        for name, param in model.named_parameters():
            unit, inner = unit_of(name, n)
            decoded = codec.decode(unit, codec.encode(unit, {inner: param.data.to(device, copy=True)}), device)
            param.data.copy_(decoded[inner].cpu())
    return model


@cache
def reference(ckpt: Path, compression: str, prompt_ids: tuple[int, ...]) -> tuple[list[int], list[torch.Tensor]]:
    model = reference_model(ckpt, compression)
    out = model.generate(
        torch.tensor([prompt_ids]),
        generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    return out.sequences[0, len(prompt_ids) :].tolist(), [x.float() for x in out.logits]


@pytest.mark.parametrize(("cache_", "compression", "prefetch", "kv_cache"), MATRIX, ids="-".join)
def test_combination_matches_reference(make_cfg, cache_: str, compression: str, prefetch: str, kv_cache: str) -> None:
    cfg = make_cfg(
        f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}", f"kv_cache={kv_cache}",
        f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false", f"workload.prompt={PROMPT}",
    )
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    gen = generate(setup, cfg, keep_logits=True)
    ref_ids, ref_logits = reference(setup.ckpt_dir, compression, tuple(gen.prompt_ids))
    assert gen.generated_ids == ref_ids
    for ours, ref in zip(gen.logits, ref_logits, strict=True):
        assert (ours - ref).abs().max().item() <= LOGIT_TOLERANCE * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_compressed_embeddings_match_their_reference(make_cfg, compression: str) -> None:
    cfg = make_cfg(
        f"compression={compression}", "compression.compress_embeddings=true", f"workload.max_new_tokens={NEW_TOKENS}",
        "workload.stop_at_eos=false", f"workload.prompt={PROMPT}",
    )
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    assert any(k.endswith(".q") for k in load_file(setup.layout.file("embed"))), "the embedding is compressed"
    gen = generate(setup, cfg)
    model = reference_model(setup.ckpt_dir, compression, compress_embeddings=True)
    out = model.generate(
        torch.tensor([gen.prompt_ids]),
        generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    assert gen.generated_ids == out.sequences[0, len(gen.prompt_ids) :].tolist()


@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_split_file_decodes_like_in_memory_quantization(make_cfg, compression: str) -> None:
    cfg = make_cfg(f"compression={compression}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    codec = setup.model.pipeline.codec
    source = LlamaForCausalLM.from_pretrained(setup.ckpt_dir).state_dict()
    for unit in ("layers.00", "layers.01"):
        index = int(unit.split(".")[1])
        prefix = f"model.layers.{index}."
        originals = {k.removeprefix(prefix): v for k, v in source.items() if k.startswith(prefix)}
        from_file = codec.decode(unit, load_file(setup.layout.file(unit)), torch.device("cpu"))
        in_memory = codec.decode(unit, codec.encode(unit, originals), torch.device("cpu"))
        assert from_file.keys() == in_memory.keys() == originals.keys()
        for key in originals:
            assert torch.equal(from_file[key], in_memory[key]), f"{unit}.{key}"
            assert from_file[key].dtype == originals[key].dtype and from_file[key].shape == originals[key].shape
        # Norms are stored as they are; Linear weights are really compressed (and lossy).
        assert torch.equal(from_file["input_layernorm.weight"], originals["input_layernorm.weight"])
        assert not torch.equal(from_file["mlp.up_proj.weight"], originals["mlp.up_proj.weight"])


CODECS = [Blockwise8bitConfig(), Blockwise4bitConfig(), Blockwise4bitConfig(quant_type="fp4", double_quant=True)]
CODEC_IDS = ["8bit", "4bit-nf4", "4bit-fp4-dq"]


def encoded_layer(cfg: CompressionConfig, device: torch.device) -> tuple[object, dict[str, torch.Tensor]]:
    """A codec and a small layer it encoded on `device`, every stored tensor there as after a layer file's copy
    (bitsandbytes leaves its packed records on the host): two Linear weights and a norm."""
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: torch.randn(64, 256, generator=generator).to(torch.bfloat16)
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight")
    }
    weights["input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    codec = strategies.build(cfg)
    stored = codec.encode("layers.00", {k: v.to(device) for k, v in weights.items()})
    return codec, {k: v.to(device) for k, v in stored.items()}


def is_record(key: str) -> bool:
    """The stored tensors that hold a weight's non-tensor state (JSON): ours for 8bit, bitsandbytes' for 4bit."""
    return key.endswith(".qs.meta") or ".qs.quant_state." in key


@pytest.mark.parametrize("cfg", CODECS, ids=CODEC_IDS)
def test_decode_is_bitsandbytes_own_and_reads_each_record_once(cfg: CompressionConfig) -> None:
    import bitsandbytes.functional as bnbf

    codec, stored = encoded_layer(cfg, CPU)
    first = codec.decode("layers.00", dict(stored), CPU)
    for weight in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        codes = stored[weight + ".q"]
        state = {k.removeprefix(weight + ".qs."): v for k, v in stored.items() if k.startswith(weight + ".qs.")}
        if isinstance(cfg, Blockwise4bitConfig):  # bitsandbytes' own unpacking of what as_dict(packed=True) wrote
            expected = bnbf.dequantize_4bit(codes, bnbf.QuantState.from_dict(state, CPU))
        else:
            quant_state = bnbf.QuantState(
                absmax=state["absmax"], code=state["code"], blocksize=cfg.blocksize, dtype=torch.bfloat16
            )
            expected = bnbf.dequantize_blockwise(codes, quant_state)
        assert torch.equal(first[weight], expected), weight
    # Later decodes never read a record (on CUDA each read is a copy to the host that waits for the device): on
    # the meta device they cannot be read at all.
    unreadable = {k: v.to("meta") if is_record(k) else v for k, v in stored.items()}
    assert sum(map(is_record, unreadable)) == 2
    again = codec.decode("layers.00", unreadable, CPU)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CODECS, ids=CODEC_IDS)
def test_decode_on_cuda_issues_its_kernels_without_waiting_for_the_device(cfg: CompressionConfig) -> None:
    """The prefetch worker decodes while the device still copies: a wait in decode serialises the two."""
    cuda = torch.device("cuda")
    codec, stored = encoded_layer(cfg, cuda)
    first = codec.decode("layers.00", dict(stored), cuda)  # reads the records: waits, once per weight and run
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = codec.decode("layers.00", dict(stored), cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize(("depth", "blocking_wait"), [(1, False), (2, False), (3, False), (1, True)])
def test_prefetch_on_cuda_starts_a_load_once_the_compute_depth_plus_one_back_is_done(
    depth: int, blocking_wait: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch's bookkeeping, run on the CPU with streams and events faked: which compute each load waits
    for, and whether it spins or sleeps there (prefetch.blocking_wait). (The gpu test below checks what that bound
    does to device memory.)"""
    handed: list[str] = []  # units the consumer has issued compute for, in order
    waits: dict[str, str | None] = {}  # unit loaded -> the unit whose compute its load waited for
    sleeps: list[bool] = []  # per wait: whether its event was made to block rather than spin

    class FakeStream:
        def wait_event(self, event: object) -> None:
            pass

    compute = FakeStream()

    class FakeEvent:
        def __init__(self, **kwargs: object) -> None:
            self.after: str | None = None
            self.blocking = kwargs.get("blocking", False)  # torch.cuda.Event's own default

        def record(self, stream: object = None) -> None:
            if stream is compute:  # on the compute stream: marks the compute issued last
                self.after = handed[-1]

        def synchronize(self) -> None:
            waits[loading.name] = self.after
            sleeps.append(self.blocking)

    loading = threading.local()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    prefetcher = PrefetchOn(PrefetchOnConfig(depth=depth, blocking_wait=blocking_wait), torch.device("cuda"))
    original = prefetcher._load

    def load(fetch, decode, name, freed=None):  # noqa: ANN001, ANN202 (PrefetchOn._load's own signature)
        loading.name = name
        waits.setdefault(name, None)
        return original(fetch, decode, name, freed)

    monkeypatch.setattr(prefetcher, "_load", load)
    names = [f"l{i}" for i in range(8)]
    for _ in range(2):  # a second pass starts afresh: the first is over, its last token read back by the host
        handed.clear()
        waits.clear()
        for layer in prefetcher.stream(names, lambda name: DeviceLayer(name, {}), lambda layer: layer):
            handed.append(layer.name)
        assert handed == names
        assert waits == {name: (names[i - depth - 1] if i > depth else None) for i, name in enumerate(names)}
    assert sleeps and set(sleeps) == {blocking_wait}


def test_a_layer_is_marked_in_use_on_a_stream_once_per_device_allocation() -> None:
    """record_stream is per allocation (the allocator's block), so a packed layer's views need one call, not one
    each: CUDA tensors faked, as the CPU has none."""
    marked: list[int] = []

    class FakeCudaTensor:
        def __init__(self, block: int, is_cuda: bool = True) -> None:
            self.block, self.is_cuda = block, is_cuda

        def untyped_storage(self) -> object:
            return type("Storage", (), {"data_ptr": lambda _: self.block})()

        def record_stream(self, stream: object) -> None:
            marked.append(self.block)

    views = {f"packed.{i}": FakeCudaTensor(0x1000) for i in range(30)}  # a 4-bit layer's stored tensors
    decoded = {f"w{i}": FakeCudaTensor(0x2000 + i) for i in range(7)}  # dequantized, each its own allocation
    table = {"on_host": FakeCudaTensor(0x3000, is_cuda=False)}  # a table looked up on the host: never marked
    _in_use_on(object(), DeviceLayer("layers.00", {**views, **decoded, **table}))
    assert sorted(marked) == [0x1000, *(0x2000 + i for i in range(7))]


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_on_cuda_holds_depth_plus_one_units_on_the_device(depth: int) -> None:
    """Nothing in a CUDA load waits for the device, so without a bound the host would load a whole pass ahead of
    a slow compute, each unit in new memory. Here each unit's compute is a long device sleep."""
    cuda = torch.device("cuda")
    mib = 1 << 20
    stored_bytes, decoded_bytes = 32 * mib, 64 * mib

    def fetch(name: str) -> DeviceLayer:
        return DeviceLayer(name, {"w": torch.empty(stored_bytes, dtype=torch.uint8, device=cuda)})

    def decode(layer: DeviceLayer) -> DeviceLayer:
        layer.weights = {"w": torch.empty(decoded_bytes, dtype=torch.uint8, device=cuda)}
        return layer

    prefetcher = PrefetchOn(PrefetchOnConfig(depth=depth), cuda)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    for layer in prefetcher.stream([f"l{i}" for i in range(12)], fetch, decode):
        torch.cuda._sleep(20_000_000)  # milliseconds of device time, microseconds of the host's
        layer.weights.clear()
    torch.cuda.synchronize()
    # Reserved, not allocated: a freed block leaves the allocated count at once, but is reused only once every
    # stream that used it has passed that use, so running ahead shows as new segments.
    peak = torch.cuda.max_memory_reserved() - base
    # depth + 1 units decoded, one more stored while it decodes (and one stored whose decode just finished).
    assert peak <= (depth + 1) * decoded_bytes + 2 * stored_bytes, peak / mib


def test_compressed_layer_files_shrink(make_cfg) -> None:
    sizes = {}
    for compression in ("none", "8bit", "4bit"):
        cfg = make_cfg(f"compression={compression}")
        layout = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
        sizes[compression] = layout.file_bytes("layers.00")
    # bf16 -> int8 + a fp32 scale per 256 -> 4 bit + a fp32 scale per 64 (plus per-tensor state records).
    assert sizes["none"] > sizes["8bit"] > sizes["4bit"]
    assert sizes["8bit"] < 0.6 * sizes["none"] and sizes["4bit"] < 0.4 * sizes["none"]


def test_kv_cache_options_give_identical_tokens(make_cfg) -> None:
    tokens = {}
    for kv in ("none", "device", "offload"):
        cfg = make_cfg(f"kv_cache={kv}", "workload.max_new_tokens=24", "workload.stop_at_eos=false")
        tokens[kv] = generate(build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")), cfg).generated_ids
    assert tokens["none"] == tokens["device"] == tokens["offload"]


def test_prefetch_loads_ahead_while_the_consumer_computes() -> None:
    """With depth d, layer i+d is being loaded before the consumer is done with layer i."""
    names = [f"l{i}" for i in range(6)]
    started = {name: threading.Event() for name in names}
    order: list[str] = []

    def load(name: str) -> str:
        started[name].set()
        order.append(f"load {name}")
        return name

    for depth in (1, 2):
        order.clear()
        for event in started.values():
            event.clear()
        prefetcher = PrefetchOn(PrefetchOnConfig(depth=depth), torch.device("cpu"))
        for i, name in enumerate(prefetcher.stream(names, load, lambda fetched: fetched)):
            ahead = names[min(i + depth, len(names) - 1)]
            # Not a timing bound: the worker needs no signal from us to start the next load.
            assert started[ahead].wait(timeout=30), f"depth {depth}: {ahead} not loading while {name} computes"
            order.append(f"use {name}")
        assert [o for o in order if o.startswith("use")] == [f"use {n}" for n in names]


def test_prefetch_loads_a_unit_in_turn_once_it_loads_faster_than_a_hand_over() -> None:
    names = ["fast", "slow", "fast2"]
    where: dict[str, list[str]] = {name: [] for name in names}

    def fetch(name: str) -> str:
        where[name].append(threading.current_thread().name)
        if name == "slow":
            time.sleep(20 * INLINE_BELOW_S)
        return name

    prefetcher = PrefetchOn(PrefetchOnConfig(depth=1), torch.device("cpu"))
    for _ in range(6):
        assert list(prefetcher.stream(names, fetch, lambda fetched: fetched)) == names
    on_worker = {name: [thread.startswith("prefetch") for thread in threads] for name, threads in where.items()}
    # The first pass knows no load times: all go to the worker. Then the fast ones load in turn (mostly: a load
    # the machine happened to pause for goes back to the worker once).
    assert on_worker["slow"] == [True] * 6
    for fast in ("fast", "fast2"):
        assert on_worker[fast][0] and on_worker[fast][1:].count(False) >= 3, on_worker


def test_bad_strategy_values_are_refused(make_cfg) -> None:
    with pytest.raises(ValueError, match="compression.quant_type='nf3'.*nf4, fp4"):
        make_cfg("compression=4bit", "compression.quant_type=nf3")
    with pytest.raises(ValueError, match="compression.blocksize=100"):
        make_cfg("compression=8bit", "compression.blocksize=100")
    with pytest.raises(ValueError, match="prefetch.depth=0"):
        make_cfg("prefetch=on", "prefetch.depth=0")



@pytest.mark.gpu
@pytest.mark.parametrize(("cache_", "compression", "prefetch", "kv_cache"), [
    ("ram", "none", "off", "device"), ("ram", "none", "on", "device"), ("disk", "4bit", "on", "offload"),
    ("ram", "8bit", "off", "none"), ("disk", "none", "off", "device"), ("disk", "8bit", "on", "device"),
], ids="-".join)
def test_combination_on_cuda(make_cfg, cache_: str, compression: str, prefetch: str, kv_cache: str) -> None:
    """The CUDA paths against transformers on the GPU: the plain runner, packed pinned RAM copies, the disk
    cache's page-locked staging slots, the prefetch copy stream, bitsandbytes' CUDA kernels, K/V offload."""
    cfg = make_cfg(
        "device=cuda", f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}",
        f"kv_cache={kv_cache}", f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false",
        f"workload.prompt={PROMPT}",
    )
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cuda"))
    gen = generate(setup, cfg, keep_logits=True)
    model = reference_model(setup.ckpt_dir, compression, device=torch.device("cuda")).cuda()
    out = model.generate(
        torch.tensor([gen.prompt_ids], device="cuda"),
        generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    assert gen.generated_ids == out.sequences[0, len(gen.prompt_ids) :].tolist()
    for ours, ref in zip(gen.logits, out.logits, strict=True):
        ref = ref.float().cpu()
        assert (ours - ref).abs().max().item() <= LOGIT_TOLERANCE * max(ref.abs().max().item(), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize(("cache_", "compression", "prefetch"), [
    ("ram", "4bit", "on"), ("ram", "none", "on"), ("disk", "8bit", "off"),
], ids="-".join)
def test_streamed_weights_reuse_device_memory_pass_after_pass(
    make_cfg, cache_: str, compression: str, prefetch: str
) -> None:
    """Weights are not given new device memory each pass: after the prefill pass, the caching allocator hands
    the blocks back, and fewer than one cudaMalloc a token remains (one per layer would be 6 a token here)."""
    cfg = make_cfg(
        "device=cuda", f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}",
        f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false",
    )
    device = torch.device("cuda")
    setup = build_setup(cfg, Path(cfg.paths.outputs), device)
    allocs = DeviceAllocs(device)
    generate(setup, cfg, on_token=lambda _: allocs.token())
    assert allocs.metrics()["device_allocs_per_token"] < 1, allocs.metrics()
    assert allocs.metrics()["device_alloc_retries_per_token"] == 0, "no cap here: nothing to free and retry"


# --- what the options state about themselves (the job asks; it never compares option names)


def test_options_state_what_they_hold_and_cost() -> None:
    cpu = torch.device("cpu")
    assert strategies.build(PrefetchOnConfig(depth=3), device=cpu).layers_ahead == 3
    assert strategies.build(strategies.option_configs()["prefetch"]["off"](), device=cpu).layers_ahead == 0
    kv = {name: strategies.build(cfg()) for name, cfg in strategies.option_configs()["kv_cache"].items()}
    assert {name: policy.layers_on_device(32) for name, policy in kv.items()} == {"none": 1, "device": 32, "offload": 1}
    assert {name: policy.recomputes_sequence for name, policy in kv.items()} == {
        "none": True, "device": False, "offload": False
    }
    codecs = {name: strategies.build(cfg()) for name, cfg in strategies.option_configs()["compression"].items()}
    assert {name: (c.lossy, c.bits) for name, c in codecs.items()} == {
        "none": (False, None), "8bit": (True, 8), "4bit": (True, 4)
    }


@dataclasses.dataclass
class RoundedConfig(CompressionConfig):
    name: str = "rounded"
    _target_: str = f"{__name__}.RoundedCodec"


class RoundedCodec:
    """A lossy option the job has never heard of: weights rounded to multiples of 1/8 at split time."""

    stored_fraction = 0.0
    lossy = True
    bits = None
    split_key = "test-rounded-8"

    def __init__(self, cfg: RoundedConfig) -> None:
        self.cfg = cfg

    def stores_plain(self, layer: str) -> bool:
        return True  # rounded, but stored as the weights it decodes to

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (t.float() * 8).round().div(8).to(t.dtype) if t.dim() == 2 else t for k, t in tensors.items()}

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return stored


def test_a_new_lossy_option_gets_its_quality_pass_without_a_job_edit(make_cfg) -> None:
    cfg = dataclasses.replace(make_cfg("workload.max_new_tokens=3", "probe.enabled=false"), compression=RoundedConfig())
    report = run_job(cfg, {}, choices={"model": "tiny", "compression": "rounded"}, overrides=[])
    assert report.quality_kl_mean is not None and report.quality_kl_mean > 0
    assert report.quality_ppl is not None and report.quality_ppl_reference is not None
