"""Host memory readings: current and peak resident set size."""

from __future__ import annotations

import os
import resource
import threading
from types import TracebackType

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


def anon_rss_bytes() -> int:
    """Resident private (anonymous) memory: what the process itself allocated.

    RSS also counts file pages mapped in, e.g. a safetensors file read through mmap; those
    are page cache the kernel can drop, not memory a split or a run holds on to.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()  # kernels before 4.5 lack the split; RSS is the upper bound


def peak_rss_bytes() -> int:
    """The process's high-water RSS since it started (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak anonymous RSS over a block, sampled in the background.

    ru_maxrss is a process-lifetime high-water mark, so it cannot tell what one step
    (e.g. the split) cost once something earlier peaked higher; sampling can.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, anon_rss_bytes())

    @property
    def peak_delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def __enter__(self) -> RssSampler:
        self.start_bytes = self.peak_bytes = anon_rss_bytes()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, anon_rss_bytes())
