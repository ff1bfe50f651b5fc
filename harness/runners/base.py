"""The runner protocol: what the job's measuring loop asks of whoever generates.

The loop (harness/job/measure.py) builds a runner from `runner._target_`, `load`s it once, calls `generate`
for each warm-up and measured generation, then asks it for what only it knows (`generation_metrics`,
`annotate`, `quality_metrics`, `log_artifacts`). What a runner can run is declared, not tested by name:
`supports` lists its options by group, and `requires` the modules of its optional extra; both are checked
before the job's run exists (`check`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from rich.console import Console

from harness.config import Config, RunnerUnavailable
from harness.extras import install_line, installed
from harness.streaming.model import Generation
from harness.workload import Workload

if TYPE_CHECKING:
    from harness.measurement.run_report import RunReport
    from harness.measurement.vram import VramMonitor
    from harness.tracking.process import Tracker

__all__ = ["Runner", "RunnerUnavailable"]


class Runner:
    """One way of generating a workload's tokens, measured by the job's loop.

    Subclasses set `supports` (None: every option of every group) and implement `load` and `generate`;
    the other methods default to adding nothing.
    """

    # Options it runs, by group (`config.OPTION_GROUPS`); the first is its own default, taken when the command line
    # chose none. A group absent here has no counterpart in it: that group's choice is none of its params.
    supports: ClassVar[Mapping[str, Sequence[str]] | None] = None
    # Import names it needs beyond layerbench's dependencies, and the optional extra that installs them.
    requires: ClassVar[Sequence[str]] = ()
    extra: ClassVar[str | None] = None

    def __init__(self, cfg: Config, options: Mapping[str, Any], device: torch.device, outputs_dir: Path) -> None:
        self.cfg = cfg
        self.options = options  # the option it runs, by group (`Config.runner_options`)
        self.device = device
        self.outputs_dir = outputs_dir

    @classmethod
    def check(cls, cfg: Config, explicit: set[str]) -> dict[str, Any]:
        """The options this runner runs for `cfg`, by group; RunnerUnavailable, naming the fix, when its extra is
        not installed or the command line chose an option it cannot run."""
        missing = [name for name in cls.requires if not installed(name)]
        if missing:
            raise RunnerUnavailable(
                f"runner={cfg.runner.name} needs {', '.join(missing)}, which is not installed: "
                f"{install_line(cls.extra or '')}"
            )
        return cfg.runner_options(cls.supports, explicit)

    def load(self, work: Workload, vram: VramMonitor, console: Console) -> None:
        """Everything before the first generation, within the VRAM monitor: the model ready on the device."""
        raise NotImplementedError

    def generate(self, on_token: Callable[[int], None] | None = None) -> Generation:
        """One generation of the workload's prompts; `on_token` is called as each step's token reaches the host."""
        raise NotImplementedError

    def generation_metrics(self, gen: Generation) -> dict[str, float]:
        """Figures of one measured generation beyond its token timing (averaged over repeats)."""
        return {}

    def release(self) -> None:
        """Free the device memory the model holds, before the VRAM monitor's last reading."""

    def annotate(self, report: RunReport, gen: Generation) -> dict[str, str]:
        """Add to `report` what only this runner measures, once the generations are done; returns its tags."""
        return {}

    def quality_metrics(self, gen: Generation) -> dict[str, float]:
        """What the runner's options cost in accuracy (quality.enabled); nothing where they cost none."""
        return {}

    def log_artifacts(self, tracker: Tracker, tmp: Path, label: str, gen: Generation) -> None:
        """Artifacts of its own beyond the job's (written into `tmp` first)."""


def runner_class(cfg: Config) -> type[Runner]:
    """The Runner class `runner._target_` names."""
    import hydra.utils  # here: only a job that runs needs it

    target = cfg.runner._target_
    try:
        cls = hydra.utils.get_class(target)
    except Exception as exc:  # not importable, or not a class: Hydra's errors name which
        raise TypeError(f"runner._target_={target!r} names no Runner class ({exc}): choose runner=<option>") from exc
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise TypeError(f"runner._target_={target!r} is not a harness.runners.base.Runner: choose runner=<option>")
    return cls
