"""hydra/launcher=ray: Ray jobs get the parent run and one malloc arena through their runtime env, and SIGTERM
stays the harness's; a missing Ray launcher is named with what to install."""

from __future__ import annotations

import sys

import pytest


def test_ray_jobs_get_the_parent_through_runtime_env_and_sigterm_stays_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import types

    from omegaconf import OmegaConf

    from harness.sweep import RAY_LAUNCHER, _start_ray

    calls: list[dict] = []

    def init(**kwargs: object) -> None:
        calls.append(kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as Ray's driver replaces it

    fake_ray = types.SimpleNamespace(is_initialized=lambda: False, shutdown=lambda: None, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)

    def ours(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        config = OmegaConf.create({"hydra": {"launcher": {
            "_target_": RAY_LAUNCHER,
            "ray": {"init": {"address": "ray://head:10001", "num_cpus": 2,
                             "runtime_env": {"env_vars": {"HF_HOME": "/data", "X": "mine"}}}},
        }}})
        OmegaConf.set_readonly(config, True)  # as Hydra hands it over
        _start_ray(config, {"LAYERBENCH_PARENT_RUN_ID": "abc", "X": "ours"})
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
    (kwargs,) = calls
    assert kwargs["runtime_env"] == {"env_vars": {
        "MALLOC_ARENA_MAX": "1", "LAYERBENCH_PARENT_RUN_ID": "abc", "HF_HOME": "/data", "X": "mine"
    }}
    # The plugin's own object-store size is not passed: ray.init refuses any when it joins a running cluster.
    assert {k: v for k, v in kwargs.items() if k != "runtime_env"} == {"address": "ray://head:10001", "num_cpus": 2}

    basic_launcher = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    _start_ray(OmegaConf.create({"hydra": {"launcher": {"_target_": basic_launcher}}}), {"X": "y"})
    assert len(calls) == 1, "Ray is started only for hydra/launcher=ray"


def test_a_missing_ray_launcher_is_named_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from harness.__main__ import missing_launcher

    assert missing_launcher(["-m", "cache=disk,ram"]) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'layerbench[ray]'" in missing_launcher(["-m", "hydra/launcher=ray", "cache=disk,ram"])
    assert missing_launcher(["-m", "+hydra/launcher=ray"]) is not None
