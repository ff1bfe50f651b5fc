"""harness.advise.space: the configurations weighed (the groups the command line leaves free), each priced by its
plan or refused with the reason and numbers a run would give; the ranking, and the ranks a verify sweep runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fake_probes import cpu_rates

import harness.runners.layerbench.cost as cost_mod
import harness.runners.layerbench.floor as floor_mod
from harness.advise import space, table
from harness.config import Config
from harness.probe.stream import StreamTimes


@pytest.fixture()
def stub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed rates and times: pricing without measuring a 70B layer on this CPU."""
    monkeypatch.setattr(floor_mod, "load_or_measure", lambda *a, **k: cpu_rates())
    monkeypatch.setattr(floor_mod, "load_or_measure_layer_compute_s", lambda *a, **k: 0.17)
    monkeypatch.setattr(floor_mod, "load_or_measure_head_compute_s", lambda *a, **k: 0.19)
    monkeypatch.setattr(cost_mod, "load_or_measure_head_compute_s", lambda *a, **k: 0.19)

    def stream(*args: object, **kwargs: object) -> StreamTimes:
        prefetch = kwargs["options"]["prefetch"]  # type: ignore[index]
        return StreamTimes(layer_s=0.5 if prefetch.layers_ahead else 0.9, pass_s=0.01)

    monkeypatch.setattr(cost_mod, "load_or_measure_stream", stream)


def test_every_option_of_the_free_groups_is_weighed(make_cfg: Callable[..., Config]) -> None:
    combos = space.space(make_cfg(), [])
    assert len(combos) == 2 * 3 * 2 * 4 * 2  # cache, compression, prefetch, kv_cache, residency
    assert len({space.label(c) for c in combos}) == len(combos)
    assert space.DEFAULT in combos and space.SEED in combos


def test_a_group_the_command_line_chose_stays_chosen(make_cfg: Callable[..., Config]) -> None:
    combos = space.space(make_cfg("compression=4bit", "kv_cache=device"), ["compression=4bit", "kv_cache=device"])
    assert len(combos) == 2 * 2 * 2
    assert {c["compression"] for c in combos} == {"4bit"} and {c["kv_cache"] for c in combos} == {"device"}


def test_what_cannot_fit_is_refused_with_the_numbers_and_never_ranked(
    make_cfg: Callable[..., Config], tmp_path: Path, stub_probe: None
) -> None:
    base = ("model=llama3-70b-synthetic", f"paths.outputs={tmp_path}")
    combos = [
        {**space.SEED, "compression": compression, "prefetch": prefetch}
        for compression in ("none", "4bit") for prefetch in ("off", "on")
    ]
    priced, refused = space.price_all(combos, lambda choices: make_cfg(*base, *space.overrides_for(choices)))
    assert [p.choices for p in priced] == [{**space.SEED, "prefetch": "off"}]
    reasons = {space.label(r.choices): r.reason for r in refused}
    assert "141.1 GB" in reasons[space.label({**space.SEED, "compression": "none", "prefetch": "off"})]
    over = reasons[space.label(space.SEED)]
    assert "needs about 4.50 GiB" in over and "over vram.cap_gib=4.0" in over
    (line,) = [x for x in table.refusals(refused) if "4.50 GiB" in x]
    assert line.startswith("refused 1 configuration (")
    best = priced[0]
    assert best.predicted_s == pytest.approx(0.01 + 80 * 0.9 + 0.19)
    assert best.peak_bytes <= 4 * 2**30 and best.bytes_per_pass > 0 and best.limiting


def _priced(choices: dict[str, str], seconds: float, batch: int = 1) -> space.Priced:
    return space.Priced(choices, seconds, batch, 1e9, 1e9, "disk", 0)


def test_the_ranking_follows_the_objective() -> None:
    slow_batch = _priced({"cache": "disk"}, 2.0, batch=8)  # 4 tokens a second
    fast = _priced({"cache": "ram"}, 0.5)  # 2 tokens a second
    assert space.ranked([slow_batch, fast], "latency") == [fast, slow_batch]
    assert space.ranked([fast, slow_batch], "throughput") == [slow_batch, fast]


def test_the_table_shows_the_top_and_the_default_and_seed_wherever_they_rank() -> None:
    ranking = [_priced({**space.DEFAULT, "cache": "disk", "kv_cache": str(i)}, i + 1.0) for i in range(5)]
    ranking += [_priced(space.SEED, 10.0), _priced(space.DEFAULT, 11.0)]
    rows = table.rows(ranking, top=2)
    assert [(r["rank"], r["note"]) for r in rows] == [(1, ""), (2, ""), (6, "seed"), (7, "default")]
    assert "| rank | cache |" in table.markdown(rows) and table.csv_text(rows).startswith("rank,cache,")


@pytest.mark.parametrize(("n", "seed", "count", "picks"), [
    (96, 40, 5, [0, 40, 48, 71, 95]),  # the best, the seed's, the slowest, evenly spaced between
    (96, None, 5, [0, 24, 48, 71, 95]),
    (3, 1, 5, [0, 1, 2]),  # all, when fewer fit than asked
    (12, 11, 2, [0, 11]),
    (10, 0, 1, [0]),
])
def test_verify_picks_spread_over_the_ranking(n: int, seed: int | None, count: int, picks: list[int]) -> None:
    assert space.verify_picks(n, seed, count) == picks
