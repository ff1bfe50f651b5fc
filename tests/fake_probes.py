"""A small decoder geometry and link rates made up for probe and floor tests (for tests in any folder: tests/, the
rootdir conftest's folder, is on sys.path)."""

from __future__ import annotations

from transformers import LlamaConfig

from harness.probe.links import LinkRates


def small_layer_config() -> LlamaConfig:
    """One decoder layer small enough to time in milliseconds."""
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=128, max_position_embeddings=64,
    )


def cpu_rates(measured_at: str = "2025-01-01T00:00:00+00:00") -> LinkRates:
    """A CPU's links at round rates: no host-to-device copy."""
    return LinkRates(
        disk_read_cold_bytes_per_s=1e9, page_cache_bytes_per_s=4e9, host_copy_bytes_per_s=10e9,
        h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None, dequant_8bit_bytes_per_s=100e9,
        dequant_4bit_bytes_per_s=50e9, device="cpu", measured_at=measured_at,
    )
