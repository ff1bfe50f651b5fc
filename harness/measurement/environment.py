"""Where a run ran: hardware, library versions and the harness's git commit, as MLflow tags.

Every probe is best effort: a tag whose value cannot be found is left out rather than
written as "0" or "none", so a missing tag in the UI always means "unknown".
Nothing here imports torch, transformers or bitsandbytes: importing them costs seconds
(and bitsandbytes warns on CPU-only machines), while package metadata answers instantly.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from harness.measurement.hostload import cpu_quota_cores

logger = logging.getLogger(__name__)

_GIT_TIMEOUT_S = 0.5
# The repository that holds the harness package, not whatever directory the command ran in.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent

_DISTRIBUTIONS = {
    "version.torch": "torch",
    "version.transformers": "transformers",
    "version.bitsandbytes": "bitsandbytes",
    "version.mlflow": "mlflow",
    "version.hydra": "hydra-core",
}


def environment_tags(outputs_dir: Path | str | None = None) -> dict[str, str]:
    """Tags describing this machine and software; never raises.

    ``outputs_dir``: when given, ``hw.disk`` names the device and filesystem it lives on
    (where splits and offloaded layers are read from, so it shapes the timings).
    """
    tags: dict[str, str] = {}
    probes: list[Callable[[], dict[str, str]]] = [
        _cpu_tags,
        _ram_tags,
        _gpu_tags,
        _version_tags,
        _git_tags,
    ]
    if outputs_dir is not None:
        probes.append(lambda: _disk_tags(Path(outputs_dir)))
    for probe in probes:
        try:
            tags.update(probe())
        except Exception:  # one broken probe must not cost the run its other tags
            logger.debug("environment probe %s failed", getattr(probe, "__name__", probe), exc_info=True)
    return {key: value.strip() for key, value in tags.items() if value is not None and value.strip()}


def usable_cores() -> int | None:
    """The cores this process may use (cgroups/taskset), which is what timings and thread pools depend on; psutil
    has no affinity on macOS, where the machine's logical cores are the best answer. None when unknown."""
    if hasattr(psutil.Process, "cpu_affinity"):
        return len(psutil.Process().cpu_affinity()) or None
    return psutil.cpu_count()


def _cpu_tags() -> dict[str, str]:
    tags: dict[str, str] = {}
    model = ""
    # psutil has no CPU model name: /proc/cpuinfo is the only source on Linux.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    model = value.strip()
                    break
    except OSError:
        pass
    tags["hw.cpu"] = model or platform.processor() or platform.machine()
    if count := usable_cores():
        tags["hw.cpu_count"] = str(count)
    # A CFS quota caps the cores' worth of time, whatever the affinity allows: absent when there is none.
    quota = cpu_quota_cores()
    if quota is not None:
        tags["hw.cpu_quota_cores"] = f"{quota:g}"
    return tags


def _ram_tags() -> dict[str, str]:
    total = psutil.virtual_memory().total
    return {"hw.ram_bytes": str(total)} if total > 0 else {}


def _visible_gpu() -> str | None:
    """The first device CUDA will use: an index or a UUID; "" when CUDA is hidden."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    first = visible.split(",")[0].strip()
    # CUDA stops at the first invalid entry, so "-1" (or "") hides every GPU.
    return "" if first in ("", "-1") else first


def _gpu_tags() -> dict[str, str]:
    visible = _visible_gpu()
    if visible == "":
        return {}
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver / no GPU: a CPU machine, not an error
        return {}
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count < 1:
            return {}
        # NVML numbers devices physically and ignores CUDA_VISIBLE_DEVICES, so map it by hand.
        if visible is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        elif visible.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
        tags = {
            "hw.gpu": _text(pynvml.nvmlDeviceGetName(handle)),
            "hw.gpu_count": str(count),
            "hw.gpu_driver": _text(pynvml.nvmlSystemGetDriverVersion()),
        }
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        if total > 0:
            tags["hw.gpu_memory_bytes"] = str(total)
        return tags
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _version_tags() -> dict[str, str]:
    tags = {"version.python": platform.python_version()}
    for tag, dist in _DISTRIBUTIONS.items():
        try:
            tags[tag] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    cuda = _torch_cuda_version()
    if cuda:
        tags["version.cuda"] = cuda
    return tags


def _torch_cuda_version() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return getattr(getattr(torch, "version", None), "cuda", None)
    # Read torch/version.py as text: importing torch just for this would take seconds.
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        version_file = Path(location) / "version.py"
        if not version_file.is_file():
            continue
        for node in ast.parse(version_file.read_text(encoding="utf-8")).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
                value = ast.literal_eval(node.value)
                return value if isinstance(value, str) else None
    return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_SOURCE_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_tags() -> dict[str, str]:
    # Fails (and so leaves both tags out) outside a checkout and before the first commit.
    commit = _git("rev-parse", "--verify", "HEAD")
    if not commit or not commit.strip():
        return {}
    tags = {"git.commit": commit.strip()}
    # Untracked files count: a new source file the commit lacks makes the run irreproducible too.
    status = _git("status", "--porcelain")
    if status is not None:
        tags["git.dirty"] = "true" if status.strip() else "false"
    return tags


def _disk_tags(outputs_dir: Path) -> dict[str, str]:
    path = outputs_dir.resolve()
    # The outputs directory may not exist yet: its nearest existing ancestor is on the same mount.
    while not path.exists() and path != path.parent:
        path = path.parent
    holding = [part for part in psutil.disk_partitions(all=True) if path.is_relative_to(part.mountpoint)]
    if not holding:
        return {}
    # The longest mount point; of equal ones the last listed, which is mounted over the others.
    best = max(reversed(holding), key=lambda part: len(part.mountpoint))
    return {"hw.disk": f"{best.device} ({best.fstype})"}
