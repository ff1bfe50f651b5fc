"""What a peer runner is: the strategy options it can honour, what it needs installed, how it loads.

A peer is measured by the same code as layerbench (token timestamps through transformers' streamer
hook, peak host memory, the VRAM monitor); each peer only says how to load the checkpoint into
something with transformers' `generate`. Strategy families it has no counterpart for are not its
params; an option it cannot honour is refused by name before anything loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import strategies


class RunnerUnavailable(RuntimeError):
    """The runner cannot run here (an optional extra is missing) or cannot run these options."""


@dataclass(frozen=True)
class LoadRequest:
    """Everything a peer needs to load one checkpoint."""

    ckpt_dir: Path
    device: Any  # torch.device; Any keeps this module free of torch
    choices: Mapping[str, str]  # its effective strategy options, by family
    vram_budget_bytes: int | None  # device memory it may fill with weights; None: no cap (CPU)
    work_dir: Path  # where it may write (offload folders, its own split)


class Peer(Protocol):
    def load(self, request: LoadRequest) -> Any:
        """A model with transformers' `generate` and `generation_config`, ready on `request.device`."""
        ...


@dataclass(frozen=True)
class PeerSpec:
    name: str
    # Strategy options the peer honours, by family; the first is what it does when the user chose none
    # (its own way of running, e.g. accelerate offloading to disk, not layerbench's default).
    # A family absent here has no counterpart in the peer: its choice is no param of the peer's runs.
    options: Mapping[str, Sequence[str]]
    # `module:Class` implementing Peer, imported only when the peer runs.
    target: str
    # Import names the peer needs beyond layerbench's dependencies, and the extra that installs them.
    requires: Sequence[str] = field(default_factory=tuple)
    extra: str | None = None

    def check_installed(self) -> None:
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if missing:
            raise RunnerUnavailable(
                f"runner={self.name} needs {', '.join(missing)}, which is not installed: "
                f"pip install 'layerbench[{self.extra}]' (or pip install -e '.[{self.extra}]' in a checkout)"
            )

    def choices(self, chosen: Mapping[str, str], explicit: set[str]) -> dict[str, str]:
        """The strategy options this peer runs with: what the user chose (refused by name where the peer
        cannot honour it), else the peer's own default."""
        effective = {}
        for family in strategies.FAMILIES:
            allowed = self.options.get(family)
            choice = chosen.get(family)
            if allowed is None:
                if family in explicit:
                    raise RunnerUnavailable(
                        f"runner={self.name} has no {family} strategy: {family}={choice} does not apply to it; "
                        f"drop {family}={choice}, or run it with runner=layerbench"
                    )
                continue
            if family not in explicit:
                effective[family] = allowed[0]
            elif choice in allowed:
                effective[family] = choice
            else:
                raise RunnerUnavailable(
                    f"runner={self.name} cannot run {family}={choice}: it supports {family}="
                    f"{'|'.join(allowed)}; use one of those, or runner=layerbench"
                )
        return effective

    def build(self) -> Peer:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)()


def explicit_families(overrides: Sequence[str]) -> set[str]:
    """The strategy families a command line (or a sweep) chose, from Hydra's task overrides."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    return {family for family in strategies.FAMILIES if family in keys}


PEERS = {
    spec.name: spec
    for spec in (
        PeerSpec(
            "transformers",
            options={"compression": ("none",), "kv_cache": ("device", "none")},
            target="harness.peers.resident:ResidentPeer",
        ),
        PeerSpec(
            "accelerate",
            # prefetch: off only: its hooks load each layer's weights as its forward starts.
            options={"cache": ("disk", "ram"), "compression": ("none",), "prefetch": ("off",),
                     "kv_cache": ("device", "none")},
            target="harness.peers.offload:OffloadPeer",
        ),
        PeerSpec(
            "airllm",
            options={
                "cache": ("disk",),
                "compression": ("none", "8bit", "4bit"),
                "prefetch": ("on", "off"),  # AirLLM prefetches by default (and never while it decompresses)
                "kv_cache": ("device", "none"),
            },
            target="harness.peers.airllm_peer:AirLLMPeer",
            requires=("airllm",),
            extra="airllm",
        ),
    )
}
