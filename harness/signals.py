"""SIGTERM raised in the main thread like Ctrl-C, so that a command's MLflow runs close KILLED with the reason
instead of staying RUNNING (a scheduler, `kill`, a container stopping)."""

from __future__ import annotations

import signal
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


def raise_on_sigterm() -> None:
    """From now on, SIGTERM raises Terminated in the main thread."""
    signal.signal(signal.SIGTERM, _terminate)
