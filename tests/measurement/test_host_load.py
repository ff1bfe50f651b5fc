"""The host's load over a generation: this process's CPU use, the hypervisor's steal, the cgroup's throttling, and
the host's own speed (a fixed loop timed at each token) beside transformers' reference."""

from __future__ import annotations

import time
from collections import namedtuple
from pathlib import Path

import pytest

import harness.measurement.hostload as hostload
from harness.measurement.hostload import HostLoad, cpu_quota_cores, speed_warning, throttled_s

# psutil's Linux fields: guest time is already inside user (and guest_nice inside nice).
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


def test_process_cpu_share_tells_a_busy_generation_from_a_waiting_one() -> None:
    busy = HostLoad()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    busy_share = busy.metrics()["process_cpu_share"]
    waiting = HostLoad()
    time.sleep(0.3)
    waiting_share = waiting.metrics()["process_cpu_share"]
    # One thread spinning: about one core (a shared 2-core machine may take some of it); sleeping: about none.
    assert busy_share > 0.5 > waiting_share, (busy_share, waiting_share)


def test_steal_is_its_share_of_the_machines_time_without_counting_guests_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter([
        CpuTimes(100, 0, 50, 800, 0, 0, 0, 50, 30, 0),
        # 100 s more in all: 60 user (of it 20 guest), 20 idle, 20 steal.
        CpuTimes(160, 0, 50, 820, 0, 0, 0, 70, 50, 0),
    ])
    monkeypatch.setattr(hostload.psutil, "cpu_times", lambda: next(readings))
    load = HostLoad(cgroup=Path("/nonexistent"))
    assert load.metrics()["host_steal_share"] == pytest.approx(0.2)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(("files", "quota"), [
    # cgroup v2: microseconds, and a quota of two cores
    ({"cpu.stat": "usage_usec 5\nthrottled_usec {t}\n", "cpu.max": "200000 100000\n"}, 2.0),
    # cgroup v1's cpu controller: nanoseconds, and a quota of half a core
    ({"cpu/cpu.stat": "nr_periods 3\nthrottled_time {t}\n", "cpu/cpu.cfs_quota_us": "50000\n",
      "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
])
def test_throttling_and_the_quota_are_read_from_either_cgroup_version(
    tmp_path: Path, files: dict[str, str], quota: float
) -> None:
    unit = 1e-6 if "cpu.max" in files else 1e-9

    def counter(seconds: float) -> None:
        for name, text in files.items():
            write(tmp_path / name, text.format(t=round(seconds / unit)))

    counter(1.0)
    assert throttled_s(tmp_path) == pytest.approx(1.0)
    assert cpu_quota_cores(tmp_path) == quota
    load = HostLoad(cgroup=tmp_path)
    time.sleep(0.2)
    counter(1.1)  # held back 0.1 s of the window
    share = load.metrics()["cpu_throttled_share"]
    assert 0.1 / 0.4 < share <= 0.1 / 0.2, share


def test_no_quota_and_no_counter_leave_the_figures_out(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "cpu.stat", "usage_usec 5\n")  # v2 without the cpu controller's throttling
    assert cpu_quota_cores(tmp_path) is None
    assert throttled_s(tmp_path) is None
    assert "cpu_throttled_share" not in HostLoad(cgroup=tmp_path).metrics()
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    (tmp_path / "cpu.max").unlink()
    assert cpu_quota_cores(tmp_path) is None


def test_the_loop_timed_at_each_token_gives_its_median(monkeypatch: pytest.MonkeyPatch) -> None:
    load = HostLoad()
    assert "host_loop_s" not in load.metrics(), "no token, no reading"
    readings = iter([1e-5, 9e-5, 2e-5])  # one token's loop slowed by a neighbour: the median keeps the usual speed
    monkeypatch.setattr(hostload, "loop_s", lambda: next(readings))
    for _ in range(3):
        load.token()
    assert load.metrics()["host_loop_s"] == 2e-5


def test_a_host_speed_change_between_the_run_and_its_reference_is_named() -> None:
    assert speed_warning(30e-6, 27e-6) is None, "within the tolerance"
    assert speed_warning(None, 27e-6) is None and speed_warning(30e-6, None) is None, "nothing to compare"
    warning = speed_warning(36e-6, 24e-6)
    assert "0.67x the speed" in warning and "36 us against 24 us" in warning and "tpot_ratio_vs_reference" in warning


def test_a_job_whose_host_slowed_against_its_reference_is_tagged(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """The run's generations on a host at half the speed of the reference's (the fixed loop faked on each side):
    the same-job ratio is tagged as skewed, with both loops' times."""
    from mlflow import MlflowClient

    import harness.job.reference as reference_mod
    from harness.job.run import run_job

    class FastHost(HostLoad):
        def token(self) -> None:
            self._loops.append(20e-6)

    monkeypatch.setattr(hostload, "loop_s", lambda: 40e-6)
    monkeypatch.setattr(reference_mod, "HostLoad", FastHost)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("reference.enabled=true", "tracking.enabled=true", f"tracking.uri={uri}",
                   "workload.max_new_tokens=3")
    report = run_job(cfg, {}, choices={}, overrides=[])
    assert (report.host_loop_s, report.reference_host_loop_s) == (40e-6, 20e-6)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert "0.50x the speed" in run.data.tags["warning.host_speed"]
