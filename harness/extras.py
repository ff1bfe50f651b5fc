"""Optional extras: whether a module one brings is installed, and the line that installs it."""

from __future__ import annotations

import importlib.util


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it. A dotted name whose parent package is absent
    (`hydra_plugins.hydra_ray_launcher` without the ray extra) makes find_spec raise: that is absent too."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def install_line(extra: str) -> str:
    """How to install one of pyproject's optional extras."""
    return f"pip install 'layerbench[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
