"""What the GPU scripts (scripts/gpucheck.py, scripts/gpulease.py) share: the wheels a bare GPU image lacks, and one
job run through the real config and job code from a preset under conf/experiment/gpucheck/.

A script, not a module of the package: the scripts run from the source tree (`pip install .` would fail on a GPU
image over the torch pin), with the checkout put on sys.path here.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the source tree's harness/ and strategies/, without `pip install .`
    sys.path.insert(0, str(ROOT))

# What the GPU image lacks, as (import name, distribution to install from the wheels).
NEEDED = (("omegaconf", "omegaconf"), ("hydra", "hydra-core"), ("bitsandbytes", "bitsandbytes"))
# Optional extras a script can run without: installed when their wheel was brought, else the runs that need them
# are skipped with the reason.
OPTIONAL = (("airllm", "airllm"),)
# The presets' folder under conf/experiment/.
PRESETS = "gpucheck"
PRESET_DIR = ROOT / "conf" / "experiment" / PRESETS

log = logging.getLogger("gpucheck")


class RefusedOverrides(ValueError):
    pass


def wheel_for(dist: str, wheels: Path) -> Path | None:
    """The wheel of distribution `dist` in `wheels` (wheel file names spell '-' as '_'), or None."""
    stem = dist.replace("-", "_").lower()
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-")] if wheels.is_dir() else []
    return found[0] if found else None


def install_missing(wheels: Path, optional: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """pip-install, offline from `wheels`, what this environment lacks of NEEDED, and of `optional` what has a wheel
    there; returns what was installed."""
    missing = [dist for module, dist in NEEDED if importlib.util.find_spec(module) is None]
    if missing and not wheels.is_dir():
        raise SystemExit(
            f"missing {', '.join(missing)} and no wheel folder {wheels}: bring their wheels (scripts/fetch_wheels.sh)"
        )
    extras = [dist for module, dist in optional if importlib.util.find_spec(module) is None]
    for dist in extras:
        if wheel_for(dist, wheels) is None:
            log.warning("%s is not installed and %s holds no wheel of it: the runs that need it are skipped", dist,
                        wheels)
    install = missing + [dist for dist in extras if wheel_for(dist, wheels) is not None]
    if install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *install]
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
    return install


def preset(name: str) -> str:
    """The override that selects a run's preset."""
    return f"+experiment={PRESETS}/{name}"


def preset_choices(name: str) -> list[str]:
    """The strategy options a preset chooses in its defaults list (`override /cache: ram` -> `cache=ram`), as
    command-line overrides. A peer runs its own option for any group the command line leaves unchosen
    (Config.runner_options), so a script passes a peer's preset choices on as if typed."""
    from omegaconf import OmegaConf

    from harness.config import OPTION_GROUPS

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RefusedOverrides(f"no preset {path}: each run is a file conf/experiment/{PRESETS}/<name>.yaml")
    chosen = []
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if not isinstance(entry, dict):
            continue
        for key, option in entry.items():
            group = key.removeprefix("override").strip().lstrip("/")
            if group in OPTION_GROUPS:
                chosen.append(f"{group}={option}")
    return chosen


def composed(overrides: list[str]) -> tuple[Any, Any]:
    """One run's configuration, composed and validated as the job takes it (the DictConfig and the Config);
    refused with the reason."""
    from harness.compose import compose_config, validated

    try:
        dcfg = compose_config(overrides)
        return dcfg, validated(dcfg)
    except Exception as exc:  # Hydra's and the schema's errors alike: the message names what is wrong
        raise RefusedOverrides(f"{type(exc).__name__}: {exc}") from exc


def choices(cfg: Any) -> dict[str, str]:
    """Each config group's option, as the job's summary and run name take them: read from the composed config."""
    from harness.config import GROUPS

    return {group: getattr(cfg, group).name for group in GROUPS}


def run_one(overrides: list[str], configured: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """One job through the real config and job code; its report, or why it failed. `configured`:
    `composed(overrides)`, when the caller already has it."""
    from omegaconf import OmegaConf

    from harness.job.run import run_job

    dcfg, cfg = configured or composed(overrides)
    try:
        report = run_job(cfg, OmegaConf.to_container(dcfg, resolve=True), choices=choices(cfg), overrides=overrides)
    except Exception as exc:  # one configuration failing (the cap, say) is a finding, not the end of the check
        log.exception("run %s failed", overrides)
        return {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}"}
    if report is None:
        return {"status": "SKIPPED", "reason": f"runner={cfg.runner.name} cannot run here (runner.skip_unavailable)"}
    return {"status": "FINISHED", "metrics": report.metrics()}
