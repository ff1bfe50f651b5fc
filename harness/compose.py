"""From conf/ to a validated Config: the schema stored in Hydra's ConfigStore, conf/ found where it is installed,
composition outside a Hydra app, and the check that refuses keys no group or schema defines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

import strategies
from harness.config import Config, DecodingConfig, ModelConfig, RunnerConfig


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore; conf/ yaml files extend these by name."""
    cs = ConfigStore.instance()
    # Under schema/, not beside the options in their groups: a schema is no option (else `compression=base_none`
    # would run, and every group's option list would show the schemas).
    cs.store(name="base_config", node=Config)  # the primary config's schema: no group, no option
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="runner", node=RunnerConfig)
    cs.store(group="schema", name="decoding", node=DecodingConfig)
    for family, options in strategies.option_configs().items():
        for option_name, node in options.items():
            cs.store(group=f"schema/{family}", name=option_name, node=node)


def conf_dir() -> str:
    """conf/ as installed (a wheel ships it as harness/conf), else beside harness/ (a checkout, -e install).

    Absolute: Hydra resolves a relative path against the calling module, which differs between
    `python -m harness` and importing `main` from another script.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"layerbench's conf/ is neither in {here} nor beside it: reinstall the package")


def compose_config(overrides: list[str]) -> DictConfig:
    """The real conf/ composed with `overrides` as the CLI would, outside a Hydra app (tests, the GPU check).
    `OmegaConf.to_object` of the result validates it."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("config", overrides=overrides)


def validated(dcfg: DictConfig) -> Config:
    """The composed config as the schema's objects (every `__post_init__` run), refusing a key that no group or
    schema defines: `+compresion=4bit` or `+foo=bar` would otherwise run, ignored, and be logged as a param."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(dcfg)
    if unknown := unknown_keys(dcfg, cfg):
        raise ValueError("; ".join(unknown))
    return cfg


def unknown_keys(node: Any, obj: Any, prefix: str = "") -> list[str]:
    """What is wrong with each key of `node` (a composed config) that the dataclass `obj` it became has no field
    for, naming the closest valid key; nested sections are checked against their own dataclasses."""
    import difflib
    from dataclasses import fields, is_dataclass

    known = {f.name for f in fields(obj)}
    problems = []
    for key in node:
        path = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"{path} is no config key{hint}: no group or schema defines it; drop it or fix its name")
        elif is_dataclass(value := getattr(obj, str(key))) and isinstance(node[key], DictConfig):
            problems += unknown_keys(node[key], value, f"{path}.")
    return problems
