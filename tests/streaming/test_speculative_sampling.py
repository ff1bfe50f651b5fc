"""Speculative sampling: the rejection rule leaves the output distributed as the target's own sampling.

Chi-square tests at significance ALPHA: each compares counts of emitted tokens with the distribution they must
follow, with enough samples that a wrong rule (accepting every draft token, or resampling from p instead of
max(0, p - q)) is rejected by the same test at the same significance.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from harness.config import Config
from harness.runners.layerbench.setup import build_setup
from harness.streaming.model import Sampler
from harness.streaming.speculative import accept, speculative_generate
from harness.workload import prompt_ids

ALPHA = 1e-3
CPU = torch.device("cpu")
# Two positions' target (p) and draft (q) distributions over a vocabulary of five, q far from p.
P = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05], [0.10, 0.20, 0.40, 0.20, 0.10]])
Q = torch.tensor([[0.05, 0.10, 0.15, 0.30, 0.40], [0.30, 0.30, 0.10, 0.10, 0.20]])
BONUS = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])  # the target's distribution after both draft tokens


def emitted_pairs(samples: int, rule: Callable[..., tuple[int, int]] = accept) -> Counter:
    """The first two tokens a verifying pass emits, over `samples` passes with two drafts drawn from Q."""
    sampler = Sampler(True, 1.0, 1.0, seed=0, device=CPU)
    logits = torch.log(torch.cat([P, BONUS.unsqueeze(0)]))  # temperature 1, top-p 1: the probabilities themselves
    ids = torch.zeros((1, 1), dtype=torch.long)
    pairs: Counter = Counter()
    for _ in range(samples):
        drafted = [sampler.draw(Q[i].unsqueeze(0))[0] for i in range(2)]
        agreed, following = rule(drafted, list(Q), logits, sampler, ids)
        tokens = drafted[:agreed] + [following]
        if len(tokens) == 1:  # the first draft rejected: the pass ends; its next token is P[1]'s, as plain sampling
            tokens.append(sampler.draw(P[1].unsqueeze(0))[0])
        pairs[tuple(tokens[:2])] += 1
    return pairs


def fits(pairs: Counter, samples: int) -> float:
    """The chi-square p-value of the pair counts against P[0] x P[1], the target's own joint distribution."""
    cells = list(itertools.product(range(5), range(5)))
    observed = np.array([pairs[cell] for cell in cells], dtype=float)
    expected = np.array([float(P[0, a]) * float(P[1, b]) for a, b in cells])
    return float(chisquare(observed, expected / expected.sum() * samples).pvalue)


def test_the_rejection_rule_emits_the_targets_distribution_and_wrong_rules_do_not() -> None:
    samples = 5_000
    assert fits(emitted_pairs(samples), samples) > ALPHA

    def accept_all(drafted: list[int], *args: object) -> tuple[int, int]:
        return len(drafted), 0

    def resample_from_p(drafted: list[int], draft_probs: list, logits: torch.Tensor, sampler: Sampler,
                        ids: torch.Tensor) -> tuple[int, int]:
        p = torch.softmax(logits, dim=-1)
        for i, token in enumerate(drafted):
            if sampler.uniform() >= min(1.0, float(p[i, token] / draft_probs[i][token])):
                return i, sampler.draw(p[i].unsqueeze(0))[0]
        return len(drafted), sampler.draw(p[-1].unsqueeze(0))[0]

    for wrong in (accept_all, resample_from_p):
        assert fits(emitted_pairs(samples, wrong), samples) < ALPHA * 1e-6, wrong.__name__


def test_greedy_acceptance_is_the_longest_agreeing_prefix_and_the_targets_argmax() -> None:
    sampler = Sampler(False, 1.0, 1.0, seed=0, device=CPU)
    logits = torch.log(torch.cat([P, BONUS.unsqueeze(0)]))
    assert accept([0, 2], None, logits, sampler, torch.zeros((1, 1))) == (2, 0)  # both argmaxes, then the bonus's
    assert accept([0, 1], None, logits, sampler, torch.zeros((1, 1))) == (1, 2)


def test_speculative_sampling_on_the_tiny_model_samples_as_plain_sampling(make_cfg: Callable[..., Config]) -> None:
    """Tokens 2 and 3 (the first is the prefill's, drawn from the target alone) over many seeds, against plain
    sampling's; the draft (tiny-draft, another model) proposes from a far other distribution, so accepting its
    tokens unchecked fails the same test."""
    temperature, samples = 2.0, 200
    cfg = make_cfg("workload.stop_at_eos=false")
    target = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    draft = build_setup(make_cfg("model=tiny-draft"), Path(cfg.paths.outputs), CPU)
    ids = prompt_ids(target.tokenizer, cfg.workload)

    def sampled(speculative: bool, seed: int) -> tuple[int, int]:
        sampler = Sampler(True, temperature, 1.0, seed=seed, device=CPU)
        if speculative:
            gen, _ = speculative_generate(target.model, draft.model, ids, 3, 2, sampler)
        else:
            gen = target.model.generate(ids, 3, sampler)
        return gen.generated_ids[1], gen.generated_ids[2]

    plain = [sampled(False, seed) for seed in range(samples)]
    spec = [sampled(True, seed + samples) for seed in range(samples)]

    def p_values(run: list[tuple[int, int]]) -> list[float]:
        """Per position, chi-square of `run` against plain sampling: counts of each token frequent in plain
        sampling, the rest pooled, so that every cell is large enough."""
        values = []
        for position in (0, 1):
            frequent = [t for t, n in Counter(p[position] for p in plain).most_common(4) if n >= 20]
            rows = [[sum(r[position] == t for r in sample) for t in frequent]
                    + [sum(r[position] not in frequent for r in sample)] for sample in (plain, run)]
            values.append(float(chi2_contingency(np.array(rows)).pvalue))
        return values

    assert min(p_values(spec)) > ALPHA / 2  # two tests: Bonferroni
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Sampler, "uniform", lambda self: 0.0)  # every draft token accepted
        unchecked = [sampled(True, seed + 2 * samples) for seed in range(samples)]
    assert p_values(unchecked)[0] < ALPHA
