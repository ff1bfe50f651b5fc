"""Host memory readings, and the background sampler that finds a peak over a block (host or device)."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable
from types import TracebackType

import psutil

from harness.allocator import release_free_memory


def anon_rss_bytes() -> int:
    """Resident private (anonymous) memory: what the process itself allocated.

    RSS also counts file pages mapped in, e.g. a safetensors file read through mmap; those
    are page cache the kernel can drop, not memory a split or a run holds on to.
    """
    # psutil has no RssAnon (its uss also counts private file-backed pages), so /proc it is.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss  # kernels before 4.5 lack the split; RSS is the upper bound


def peak_rss_bytes() -> int:
    """The process's high-water RSS since it started or since `reset_peak_rss` (ru_maxrss, in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the high-water RSS from the current RSS; False where the kernel does not allow it.

    A sweep runs its jobs one after another in one process: without this, every job would report the
    peak of the hungriest job before it (a resident transformers model before a streamed run, say).
    Linux resets the mark (VmHWM, and with it ru_maxrss) on writing 5 to /proc/self/clear_refs. The heap's free
    pages go back to the kernel first: under bench.host_malloc=reuse the process keeps what it frees
    (allocator.py), and what the jobs before freed is no part of this one's peak.
    """
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakSampler:
    """The highest reading of ``read`` over a block, sampled every ``interval_s`` by a background thread.

    ``read`` returns bytes, or None when there is nothing to read yet (a reading left out). The first
    reading (on entry) is ``start_bytes``, and a last one is taken on exit, so even a block shorter than
    one interval has a peak. An exception from ``read`` in the thread stops sampling and is raised on exit.
    Each reading's own time is kept too (``read_mean_s``, ``read_max_s``): a slow reading is time the
    measured work may share its host, and on CUDA its driver, with.
    """

    def __init__(self, read: Callable[[], int | None], interval_s: float = 0.01, name: str = "peak-sampler") -> None:
        self.read = read
        self.interval_s = interval_s
        self.name = name
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self.reads = 0
        self.read_total_s = 0.0
        self.read_max_s = 0.0

    @property
    def peak_delta_bytes(self) -> int | None:
        """How far the peak rose above the first reading."""
        if self.start_bytes is None or self.peak_bytes is None:
            return None
        return self.peak_bytes - self.start_bytes

    @property
    def read_mean_s(self) -> float | None:
        return self.read_total_s / self.reads if self.reads else None

    def _timed_read(self) -> int | None:
        t0 = time.perf_counter()
        try:
            return self.read()
        finally:
            elapsed = time.perf_counter() - t0
            self.reads += 1
            self.read_total_s += elapsed
            self.read_max_s = max(self.read_max_s, elapsed)

    def sample(self) -> None:
        value = self._timed_read()
        if value is not None:
            self.peak_bytes = value if self.peak_bytes is None else max(self.peak_bytes, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # handed to the caller by stop(): a thread's exception would only be printed
                self._error = exc
                return

    def start(self) -> PeakSampler:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        self.start_bytes = self.peak_bytes = self._timed_read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self.sample()

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RssSampler(PeakSampler):
    """Peak anonymous RSS over a block.

    ru_maxrss is a process-lifetime high-water mark, so it cannot tell what one step
    (e.g. the split) cost once something earlier peaked higher; sampling can.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        super().__init__(anon_rss_bytes, interval_s, name="rss-sampler")
