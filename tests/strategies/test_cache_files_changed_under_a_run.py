"""A layer file truncated while a run has it mapped: named in a clear error, never a bus error (SIGBUS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import strategies.cache.files as files_mod
from harness.runners.layerbench.setup import build_setup, generate
from strategies.cache.files import MappedFileShrank, make_resident, read_layer_file


@pytest.fixture(autouse=True)
def populate_works() -> None:
    if not files_mod._populate.works:
        pytest.skip("this kernel lacks madvise(MADV_POPULATE_READ) (Linux 5.14+), which finds a shrunk file")


def test_a_mapped_file_truncated_is_named_instead_of_faulting(tmp_path: Path) -> None:
    path = tmp_path / "layer.safetensors"
    save_file({"w": torch.randn(512, 1024)}, path)
    tensors = read_layer_file(path, cold=False)
    os.truncate(path, 4096)
    with pytest.raises(MappedFileShrank, match=rf"{path} is 4096 bytes now, shorter than when the run mapped it"):
        make_resident(tensors, kept=True, path=path)
    assert files_mod._populate.works  # the kernel has the advice: a shrunk file is no reason to stop using it


def test_a_disk_run_whose_layer_file_is_truncated_fails_naming_it_and_the_next_run_rewrites_it(
    make_cfg, tmp_path: Path
) -> None:
    cfg = make_cfg("cache=disk", f"split.dir={tmp_path / 'splits'}", "workload.max_new_tokens=3")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    expected = generate(setup, cfg).sequences  # the files are mapped, and kept between passes
    path = setup.layout.file("layers.01")
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(MappedFileShrank, match=rf"{path} is \d+ bytes now.*the next run verifies it again"):
        generate(setup, cfg)
    again = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))  # the cheap check finds and rewrites it
    assert generate(again, cfg).sequences == expected
