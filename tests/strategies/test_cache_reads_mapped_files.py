"""Caches on the CPU: layers computed straight from the mapped split files, every page read in the read stage."""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import harness.streaming.pipeline as pipeline_mod
import strategies.cache.files as files_mod
import strategies.cache.ram as ram_mod
from harness.runners.layerbench.setup import build_setup, generate
from harness.streaming.pipeline import PackedLayout, copy_to
from strategies.cache.files import FileLayout, PinnedRing, make_resident, read_layer_file, read_packed


def _file_mappings() -> list[tuple[int, int, str]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, fields[5]))
    return out


def test_a_layer_is_read_without_a_copy(make_cfg) -> None:
    cfg = make_cfg()
    layout = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
    path = layout.file("layers.00")
    tensors = read_layer_file(path, cold=False)
    mappings = _file_mappings()
    for name, t in tensors.items():
        owners = [file for lo, hi, file in mappings if lo <= t.data_ptr() < hi]
        assert owners == [str(path)], f"{name} is not a view of {path.name}'s mapping"


def test_touching_pages_is_the_fallback_and_reads_the_same(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg()
    layout = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
    populated = read_layer_file(layout.file("layers.01"), cold=True)
    monkeypatch.setattr(files_mod._populate, "works", False)
    touched = read_layer_file(layout.file("layers.01"), cold=True)
    assert populated.keys() == touched.keys() and all(torch.equal(populated[k], touched[k]) for k in populated)


TIED = "+model.config_overrides.tie_word_embeddings=true"


@pytest.mark.parametrize(
    ("cache", "compression", "extra", "on_cpu", "on_cuda"),
    [
        ("ram", "none", (), False, True),  # on a CPU the held table is on the device already
        ("ram", "4bit", (), False, True),
        ("ram", "8bit", ("compression.compress_embeddings=true",), False, False),  # its rows would need decoding
        ("disk", "none", (), True, True),  # mapped, not read: a pass reads its rows' pages
        ("disk", "4bit", (), True, True),
        ("disk", "none", (TIED,), False, False),  # the tied lm_head reads the whole table anyway
    ],
)
def test_only_an_embedding_stored_plain_that_no_other_unit_reads_whole_is_looked_up_on_the_host(
    make_cfg, cache: str, compression: str, extra: tuple[str, ...], on_cpu: bool, on_cuda: bool
) -> None:
    cfg = make_cfg(f"cache={cache}", f"compression={compression}", *extra)
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    pipeline = setup.pipeline
    assert pipeline.looks_up_on_host("embed") is on_cpu
    # The decision alone, as on a GPU machine; nothing here touches a device.
    pipeline.device = torch.device("cuda")
    assert pipeline.looks_up_on_host("embed") is on_cuda
    assert not any(pipeline.looks_up_on_host(u) for u in setup.layout.units if u != "embed")
    pipeline.resident["embed"] = {}  # a resident table is on the device already
    assert not pipeline.looks_up_on_host("embed")


@pytest.mark.parametrize("cache", ["disk", "ram"])
def test_tied_embeddings_are_read_once_per_pass(make_cfg, cache: str) -> None:
    cfg = make_cfg(f"cache={cache}", TIED, "workload.max_new_tokens=3")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    layout = setup.layout
    assert layout.readers("lm_head") == layout.readers("embed") == 2 and layout.readers("norm") == 1
    every_file_once = sum(layout.file_bytes(u) for u in layout.units if u != "lm_head")
    cache_impl = setup.pipeline.cache
    before = cache_impl.bytes_read
    generate(setup, cfg)
    first_pass = every_file_once
    later_passes = every_file_once if cache == "disk" else 0
    assert cache_impl.bytes_read - before == first_pass + 2 * later_passes
    # The tensors, without each file's header; the shared file once.
    held = cache_impl.bytes_held
    assert held == 0 if cache == "disk" else every_file_once - 1024 * len(layout.units) < held < every_file_once


def resident_fraction(path: Path) -> float:
    """The share of the file's pages in the OS page cache (mincore over a fresh mapping, which faults nothing)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapping:
        view = (ctypes.c_char * len(mapping)).from_buffer(mapping)
        pages = -(-len(mapping) // mmap.PAGESIZE)
        vector = ctypes.create_string_buffer(pages)
        assert files_mod._LIBC.mincore(ctypes.addressof(view), len(mapping), vector) == 0
        del view  # the mapping closes only once no buffer exports it
        return sum(b & 1 for b in vector.raw) / pages


def test_an_untied_table_read_every_pass_is_mapped_and_only_its_rows_are_read(make_cfg) -> None:
    # A table of 32768 rows (8 MB) of which the tokenizer's ids use the first 1024: a whole read would show.
    cfg = make_cfg("cache=disk", "cache.page_cache=cold", "+model.config_overrides.vocab_size=32768",
                   "workload.max_new_tokens=4", "workload.stop_at_eos=false")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    layout, cache_impl = setup.layout, setup.pipeline.cache
    assert setup.config.vocab_size == 32768 and layout.readers("embed") == 1
    before = cache_impl.bytes_read
    gen = generate(setup, cfg)
    # Every other file once a pass (dropped from the page cache first); the table by the lookup's page faults.
    table = layout.file_bytes("embed")
    assert cache_impl.bytes_read - before == 4 * (layout.files_bytes(layout.units) - table)
    assert resident_fraction(layout.file("embed")) < 0.1
    assert resident_fraction(layout.file("layers.00")) == 1.0  # the check can see a file that was read
    model = LlamaForCausalLM.from_pretrained(setup.ckpt_dir, attn_implementation="sdpa").eval()
    out = model.generate(torch.tensor([gen.prompt_ids]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert gen.generated_ids == out[0, len(gen.prompt_ids):].tolist()


def test_a_cold_disk_run_is_held_against_a_plain_read_of_its_files(make_cfg) -> None:
    from harness.job.run import run_job

    cfg = make_cfg("cache=disk", "cache.page_cache=cold", "workload.max_new_tokens=3")
    report = run_job(cfg, {}, choices={"cache": "disk"}, overrides=[])
    assert report.plain_read_bytes_per_s > 0 and report.read_bandwidth_bytes_per_s > 0
    assert report.read_efficiency == pytest.approx(report.read_bandwidth_bytes_per_s / report.plain_read_bytes_per_s)
    # The disk floor of a cold run: its bytes at the plain read rate of its own files.
    assert report.floor_disk_s == pytest.approx(report.read_bytes_per_pass / report.plain_read_bytes_per_s)
    warm_ram = make_cfg("cache=ram", "workload.max_new_tokens=3", "bench.warmup=1")
    ram = run_job(warm_ram, {}, choices={"cache": "ram"}, overrides=[])
    assert ram.read_efficiency is None, "after its warm-up cache=ram reads nothing: no figure, not 0"
    warm = run_job(make_cfg("cache=disk", "workload.max_new_tokens=3"), {}, choices={"cache": "disk"}, overrides=[])
    assert warm.read_efficiency is None, "a warm run is not read against storage twice"


# --- the CUDA staging path (packed reads into reused page-locked slots), on the CPU with pinning off


@pytest.mark.parametrize("compression", ["none", "8bit", "4bit"])
def test_a_packed_read_holds_the_files_tensors_in_one_buffer(make_cfg, compression: str) -> None:
    cfg = make_cfg(f"compression={compression}")
    layout = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
    for unit in layout.units:
        path = layout.file(unit)
        expected = load_file(path)
        file_layout = FileLayout.of(path)
        buffer = torch.full((file_layout.data_bytes + 17,), 0xAB, dtype=torch.uint8)  # a slot may be larger
        packed = read_packed(path, file_layout, buffer)
        assert packed.keys() == expected.keys()
        for key, t in packed.items():
            assert t.dtype == expected[key].dtype and torch.equal(t, expected[key]), f"{unit}: {key}"
            assert t.untyped_storage().data_ptr() == buffer.data_ptr(), f"{unit}: {key} is not a view of the slot"
        # What the pipeline copies to the device: the span, in one piece, and views of the copy.
        packing = PackedLayout.of(packed)
        assert packing.span(packed).numel() == packing.nbytes == file_layout.data_bytes
        moved = copy_to(packed, torch.device("cpu"), packing)
        assert moved.keys() == expected.keys()
        for key, t in moved.items():
            assert t.dtype == expected[key].dtype and torch.equal(t, expected[key]), f"{unit}: {key}"
        assert len({t.untyped_storage().data_ptr() for t in moved.values()}) == 1, "one buffer, one transfer"
        assert next(iter(moved.values())).untyped_storage().data_ptr() != buffer.data_ptr(), "a copy, not the slot"
        # The next pass reads the same file into another slot: the layout fits it, and its span is that slot's.
        other = torch.zeros(file_layout.data_bytes + 64, dtype=torch.uint8)
        again = read_packed(path, file_layout, other[64:])
        assert packing.fits(again)
        assert packing.span(again).data_ptr() == other.data_ptr() + 64 + file_layout.data_bytes - packing.nbytes
        assert all(torch.equal(t, expected[k]) for k, t in copy_to(again, torch.device("cpu"), packing).items())
        # A copy that does not start its buffer (8 bytes in: aligned for every dtype) is viewed where it lies.
        larger = torch.zeros(packing.copy_size() + 8, dtype=torch.uint8)
        larger[8 : 8 + packing.nbytes] = packing.span(again)
        inside = packing.views_of(larger[8:])
        assert all(torch.equal(inside[k], expected[k]) for k in expected), f"{unit}: viewed from the buffer's start"


def test_tensors_of_separate_buffers_are_not_taken_for_a_packed_layer() -> None:
    a, b = torch.ones(4), torch.zeros(4)
    assert PackedLayout.of({"a": a, "b": b}) is None
    buffer = torch.zeros(64, dtype=torch.uint8)
    packed = {"a": buffer[0:16].view(torch.float32), "b": buffer[17:19]}
    assert PackedLayout.of(packed) is not None
    # A float32 view 19 bytes into the span would be misaligned in a copy of the span alone.
    assert PackedLayout.of({"a": buffer[1:17], "b": buffer[20:28].view(torch.float32)}) is None
    # A later read that is not laid out alike is not taken for one that is.
    layout = PackedLayout.of(packed)
    assert not layout.fits({"a": a, "b": b}), "separate buffers"
    assert not layout.fits({"b": packed["b"], "a": packed["a"]}), "other order"
    assert not layout.fits({"a": buffer[0:16].view(torch.float32), "b": buffer[18:20]}), "moved within the buffer"


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_layers_copied_as_on_cuda_generate_as_the_mapped_path(make_cfg, monkeypatch, cache: str) -> None:
    """The device copy as CUDA makes it (one transfer of the packed span, viewed by the layout found at the unit's
    first copy), made on the CPU: cache=ram holds each file packed in one buffer (pinned on CUDA), cache=disk reads
    each pass into another of two staging slots, which the layout must follow. Tokens and logits are those of the
    mapped path, which the reference matrix checks."""
    cfg = make_cfg(f"cache={cache}", "compression=4bit", "prefetch=on", "workload.max_new_tokens=4",
                   "workload.stop_at_eos=false")
    on_the_cpu = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    mapped = generate(on_the_cpu, cfg, keep_logits=True)
    assert on_the_cpu.pipeline._layouts == {}, "nothing is copied on the CPU: no layout is looked for"
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    # What a CUDA device gets, but not pinned: pinning needs CUDA.
    if cache == "disk":
        setup.pipeline.cache._ring = PinnedRing(2, torch.device("cpu"))
    else:
        def read_packed_unpinned(path: Path, cold: bool, pin: bool = False) -> dict[str, torch.Tensor]:
            layout = FileLayout.of(path)
            return read_packed(path, layout, torch.empty(layout.data_bytes, dtype=torch.uint8))

        monkeypatch.setattr(ram_mod, "read_layer_file", read_packed_unpinned)
    copies: list[str] = []

    def copy_always(stored, device, layout_of):  # noqa: ANN001, ANN202 (to_device's own signature)
        layout = layout_of(stored)
        copies.append("packed" if layout is not None else "per tensor")
        return pipeline_mod.copy_to(stored, device, layout)

    monkeypatch.setattr(pipeline_mod, "to_device", copy_always)
    copied = generate(setup, cfg, keep_logits=True)
    assert copied.generated_ids == mapped.generated_ids
    assert all(torch.equal(a, b) for a, b in zip(copied.logits, mapped.logits, strict=True))
    assert "packed" in copies
    layouts = setup.pipeline._layouts
    assert all(layouts[f"layers.{i:02d}"] is not None for i in range(setup.config.num_hidden_layers))


def test_the_ring_hands_out_its_slots_in_turn_and_grows_them() -> None:
    ring = PinnedRing(2, torch.device("cpu"))
    first, second = ring.slot(100), ring.slot(50)
    assert first.data_ptr() != second.data_ptr() and first.numel() == 100
    assert ring.slot(80).data_ptr() == first.data_ptr(), "reused, not allocated again"
    assert ring.slot(200).numel() == 200, "a larger file grows its slot"
    assert ring.bytes_held == 100 + 200


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_disk_cache_through_staging_slots_generates_as_the_mapped_path(make_cfg, prefetch: str) -> None:
    """cache=disk as on CUDA (files read into two reused slots; tied embeddings in their own), with the
    same tokens and logits as the mapped path, which the reference matrix checks against transformers."""
    cfg = make_cfg("cache=disk", "compression=4bit", f"prefetch={prefetch}", "workload.max_new_tokens=4",
                   "+model.config_overrides.tie_word_embeddings=true", "workload.stop_at_eos=false")
    mapped = generate(build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")), cfg, keep_logits=True)
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    cache = setup.pipeline.cache
    cache._ring = PinnedRing(2, torch.device("cpu"))  # what a CUDA device gets; pinning is off on the CPU
    staged = generate(setup, cfg, keep_logits=True)
    assert staged.generated_ids == mapped.generated_ids
    assert all(torch.equal(a, b) for a, b in zip(staged.logits, mapped.logits, strict=True))
    assert set(cache._own_slot) == {setup.layout.file("embed")}, "the tied file has its own slot"
    assert 0 < cache.bytes_held <= 2 * max(setup.layout.file_bytes(u) for u in setup.layout.units) + \
        setup.layout.file_bytes("embed")


def test_a_kept_mapping_is_scanned_and_populated_only_where_pages_are_missing(make_cfg, monkeypatch) -> None:
    cfg = make_cfg("cache=disk")
    path = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout.file("layers.00")
    files_mod.drop_page_cache(path)
    # A plain mapping of the cold file (safetensors' own load reads the pages in as it maps them).
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        tensors = {"file": torch.frombuffer(mapped, dtype=torch.uint8)}
        in_memory = functools.partial(files_mod._mincore.all_in, tensors["file"].data_ptr(), len(mapped))
        if in_memory() is not False:
            pytest.skip("this filesystem keeps the file in memory whatever is dropped (tmpfs, overlay)")
        populated: list[int] = []
        with monkeypatch.context() as patch:
            patch.setattr(files_mod, "_populate", lambda start, length: populated.append(length) or True)
            make_resident(tensors, kept=True)
        assert populated, "pages out of memory were not read"
        make_resident(tensors)
        assert in_memory() is True
        with monkeypatch.context() as patch:
            patch.setattr(files_mod, "_populate", lambda start, length: populated.append(length) or True)
            populated.clear()
            make_resident(tensors, kept=True)
        assert not populated, "a kept mapping whose pages are all in memory is walked again"
        tensors.clear()  # before the mapping closes: the tensor exports its buffer
