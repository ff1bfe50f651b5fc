"""bench.warmup: a count of generations thrown away, or auto: at least two and at least bench.warmup_auto_s
seconds of them; the job logs how many ran."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.config import WARMUP_AUTO_GENERATIONS, BenchConfig, Config
from harness.job.run import run_job


def test_auto_needs_both_the_count_and_the_time() -> None:
    auto = BenchConfig(warmup="auto", warmup_auto_s=10.0)
    assert WARMUP_AUTO_GENERATIONS == 2
    assert auto.warms_up_more(0, 0.0) and auto.warms_up_more(1, 60.0), "one long generation is not enough"
    assert auto.warms_up_more(5, 9.9), "short generations go on until the time is up"
    assert not auto.warms_up_more(2, 10.0)
    fixed = BenchConfig(warmup=3)
    assert [fixed.warms_up_more(done, 1e9) for done in range(5)] == [True, True, True, False, False]
    assert not BenchConfig(warmup=0).warms_up_more(0, 0.0)


@pytest.mark.parametrize("value", ["often", -1, 1.5, True])
def test_a_warmup_that_is_no_count_nor_auto_is_refused_by_name(value: object) -> None:
    with pytest.raises(ValueError, match=r"bench.warmup"):
        BenchConfig(warmup=value)


def test_a_job_logs_the_warmup_generations_auto_ran(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("bench.warmup=auto", "bench.warmup_auto_s=0.2", "workload.max_new_tokens=3", "probe.enabled=false")
    report = run_job(cfg, {}, choices={}, overrides=[])
    assert report.warmup_generations >= WARMUP_AUTO_GENERATIONS
    fixed = run_job(make_cfg("bench.warmup=1", "workload.max_new_tokens=3", "probe.enabled=false"), {},
                    choices={}, overrides=[])
    assert fixed.warmup_generations == 1
