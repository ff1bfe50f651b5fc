"""A job's MLflow run, tracked from a process of its own so that MLflow's start overlaps the job's.

Importing mlflow and opening its SQLAlchemy store take seconds, about as long as importing the modeling
code of transformers; in one process they would run one after the other. Started first, this process opens
the store on another core while the job imports and builds, and the job waits for it only at `start`, when
the run must exist. A sweep's jobs keep an in-process `RunTracker`: their driver has imported mlflow
already, and a process per job would start it again each time.

`TrackerProcess` has `RunTracker`'s methods. Each call waits for the child's answer, so an artifact's
file may be deleted as soon as the call returns, and an error surfaces where the call was made. When the
job's process dies without ending its run (SIGKILL, out of memory), the child sees its pipe close and
ends the run KILLED, which an in-process tracker cannot.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from harness.tracking.client import RunTracker
from harness.tracking.orphans import orphan_reason, owner_tags
from harness.tracking.record import PermanentStoreError, one_line


def _forwarded(method: str) -> Callable[..., None]:
    """A `RunTracker` method, run in the child; its arguments and errors as `RunTracker`'s own."""

    def call(self: TrackerProcess, *args: Any, **kwargs: Any) -> None:
        self._call(method, *args, **kwargs)

    call.__name__ = method
    return call


class TrackerProcess:
    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.run_id: str | None = None
        # This checkout (or site-packages) first on the child's path, whatever its working directory.
        path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)
        # stderr is the job's own: MLflow's warnings land where they always did.
        self._child = subprocess.Popen(
            [sys.executable, "-m", "harness.tracking.process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        self._opened = False
        self._send(("open", (uri, experiment), {}))

    def _exited(self) -> PermanentStoreError:
        return PermanentStoreError(f"the MLflow tracking process exited (code {self._child.wait()})")

    def _send(self, message: tuple[str, tuple, dict]) -> None:
        assert self._child.stdin is not None
        try:
            pickle.dump(message, self._child.stdin)
            self._child.stdin.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the pipe was closed after an earlier failure
            raise self._exited() from None

    def _answer(self) -> Any:
        assert self._child.stdout is not None
        try:
            ok, value = pickle.load(self._child.stdout)
        except EOFError:
            raise self._exited() from None
        if not ok:
            raise value
        return value

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self._opened:
            self._opened = True
            self._answer()  # the store's opening: its error (a server that does not answer) is raised here
        self._send((method, args, kwargs))
        return self._answer()

    def start(self, **kwargs: Any) -> str:
        self.run_id = self._call("start", **kwargs)
        return self.run_id

    log_params = _forwarded("log_params")
    set_tags = _forwarded("set_tags")
    log_metrics = _forwarded("log_metrics")
    log_series = _forwarded("log_series")
    log_dict = _forwarded("log_dict")
    log_text = _forwarded("log_text")
    log_artifact = _forwarded("log_artifact")
    end = _forwarded("end")

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the child exit (ending a run still open KILLED) and wait for it, up to `timeout_s`: a child still
        waiting on a failing store goes on alone."""
        if self._child.stdin is not None and not self._child.stdin.closed:
            try:
                self._child.stdin.close()
            except BrokenPipeError:  # the child is gone already; its exit code is all that is left
                pass
        try:
            self._child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass


# What a job logs through: in its own process, or in this one.
Tracker = RunTracker | TrackerProcess


def _serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    tracker: RunTracker | None = None
    job = owner_tags(os.getppid())  # the job's process, which a run started without owner tags still has
    while True:
        try:
            method, args, kwargs = pickle.load(requests)
        except EOFError:
            break
        try:
            if method == "open":
                tracker, value = RunTracker(*args, **kwargs), None
            else:
                assert tracker is not None, "opened first"
                value = getattr(tracker, method)(*args, **kwargs)
            answer: tuple[bool, Any] = (True, value)
        except Exception as exc:
            answer = (False, exc)
        try:
            data = pickle.dumps(answer)
            pickle.loads(data)  # some exceptions pickle but cannot be rebuilt (a required keyword argument)
        except Exception:  # then its text still reaches the job
            data = pickle.dumps((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
        answers.write(data)
        answers.flush()
    if tracker is not None and tracker.run_id is not None and not tracker.ended:
        # The job's process is gone (its pipe closed unasked): its run ends KILLED, with what its fault log says.
        try:
            tracker.end("KILLED", reason=orphan_reason({**job, **tracker.client.get_run(tracker.run_id).data.tags}))
        except Exception as exc:  # the store fails too: the next job or report that opens it closes the run
            print(f"could not close run {tracker.run_id} of {tracker.uri}: {one_line(exc)}", file=sys.stderr)


if __name__ == "__main__":
    # Ctrl-C and SIGTERM are the job's to handle: it ends the run through this process, which must outlive
    # them to do so (a terminal's Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers go through the original stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, answers)
    # Every call was answered and the run is ended; the interpreter's teardown of mlflow and SQLAlchemy
    # (about a second) would only keep the job waiting in `close`.
    os._exit(0)
