"""harness.runners.layerbench.quality: a model against itself is perfect, compression's costs show over both
texts, and a run that decodes other tokens than transformers says so loudly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.runners.layerbench.quality import quality_metrics, text_ids
from harness.runners.layerbench.setup import build_setup, fresh_model, generate
from strategies.cache.files import read_layer_file


def test_quality_of_a_model_against_itself_is_perfect(make_cfg) -> None:
    cfg = make_cfg("workload.max_new_tokens=6")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    gen = generate(setup, cfg)
    ids = gen.prompt_ids + gen.generated_ids
    m = quality_metrics(fresh_model(setup), fresh_model(setup), ids, text_ids(setup.tokenizer, 48))
    assert m["quality_top1_agreement"] == 1.0
    assert m["quality_kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["quality_ppl"] == m["quality_ppl_reference"]


@pytest.mark.parametrize(("compression", "min_agreement"), [("8bit", 0.9), ("4bit", 0.5)])
def test_compression_costs_show(make_cfg, compression: str, min_agreement: float) -> None:
    plain_cfg = make_cfg("workload.max_new_tokens=16", "workload.stop_at_eos=false")
    plain = build_setup(plain_cfg, Path(plain_cfg.paths.outputs), torch.device("cpu"))
    cfg = make_cfg(f"compression={compression}")
    lossy = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    gen = generate(plain, plain_cfg)
    ids = gen.prompt_ids + gen.generated_ids
    m = quality_metrics(fresh_model(lossy), fresh_model(plain), ids, text_ids(plain.tokenizer, 64))
    assert min_agreement <= m["quality_top1_agreement"] <= 1.0
    assert m["quality_kl_mean"] > 0, "a lossy codec cannot be free"
    assert m["quality_ppl"] != m["quality_ppl_reference"]


def test_cold_page_cache_drops_the_file_before_reading(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg()
    layout = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
    advised = []
    real = os.posix_fadvise

    def recording_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append(advice)
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    warm = read_layer_file(layout.file("layers.00"), cold=False)
    assert advised == []
    cold = read_layer_file(layout.file("layers.00"), cold=True)
    assert advised == [os.POSIX_FADV_DONTNEED]
    assert warm.keys() == cold.keys() and all(torch.equal(warm[k], cold[k]) for k in warm)
    with pytest.raises(ValueError, match="cache.page_cache='tepid'"):
        make_cfg("cache.page_cache=tepid")


def test_quality_covers_both_texts_and_says_how_many_positions(make_cfg) -> None:
    cfg = make_cfg("compression=4bit")
    lossy = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    plain = build_setup(cfg.uncompressed(), Path(cfg.paths.outputs), torch.device("cpu"))
    texts = text_ids(plain.tokenizer, 40)
    assert list(texts) == ["corpus", "essay"] and all(len(ids) == 40 for ids in texts.values())
    run_ids = texts["essay"][:7]
    m = quality_metrics(fresh_model(lossy), fresh_model(plain), run_ids, texts)
    assert m["quality_positions"] == 80 and m["quality_run_positions"] == 7
    assert m["quality_text_tokens"] == m["quality_essay_tokens"] == 40
    assert m["quality_ppl_essay"] != m["quality_ppl_essay_reference"]
    assert 0 < m["quality_top1_agreement"] <= 1 and m["quality_kl_mean"] > 0


def test_a_run_that_decodes_other_tokens_than_transformers_says_so_loudly(make_cfg, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from harness.job.run import run_job

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # fp4 with 4096-weight blocks: coarse enough that the tiny model's greedy path leaves transformers'.
    cfg = make_cfg("compression=4bit", "compression.quant_type=fp4", "compression.blocksize=4096",
                   "reference.enabled=true", "quality.enabled=false", "tracking.enabled=true", f"tracking.uri={uri}",
                   "workload.max_new_tokens=32", "workload.stop_at_eos=false")
    report = run_job(cfg, {}, choices={"compression": "4bit"}, overrides=[])
    assert report.agreement_vs_transformers < 1, "coarse 4-bit weights against the bf16 checkpoint: tokens diverge"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert "agree with transformers" in run.data.tags["warning.agreement"]
