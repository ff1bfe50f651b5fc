"""Speculative decoding over the streamed target: a resident draft proposes k tokens, one streamed pass of
the target scores all of them, and the longest prefix the target accepts is kept, plus one token of the
target's own. A streamed pass costs about the same for one position or k + 1 (its bytes dominate), so each
accepted draft token saves most of a pass.

Greedy, a draft token is accepted when it is the target's argmax; with `verify="exact"` each position is
scored as its own one-token step (`StreamingModel.forward_steps`), so the tokens are greedy's bit for bit in
any dtype. Sampling, the standard rejection rule keeps the output distributed as the target's own sampling:
a draft token x is accepted with probability min(1, p(x) / q(x)), else the token is drawn from the normalized
max(0, p - q); p and q are the target's and the draft's distributions after the same temperature and top-p.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import Cache

from harness.measurement.timeline import Timeline
from harness.streaming.model import Generation, Sampler, StreamingModel
from strategies.kv_cache.base import cache_bytes


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    draft_s: float = 0.0

    def metrics(self, generation: Generation) -> dict[str, float]:
        passes = self.verify_passes + 1  # and the prefill, which verified nothing
        elapsed = generation.token_times_s[-1] - generation.start_s
        out = {
            "spec_passes_per_token": passes / len(generation.generated_ids),
            "spec_draft_share": self.draft_s / elapsed if elapsed > 0 else 0.0,
        }
        if self.drafted:
            out["spec_accepted_share"] = self.accepted / self.drafted
            out["spec_accepted_per_pass"] = self.accepted / self.verify_passes
            out["spec_draft_step_s"] = self.draft_s / self.drafted
        return out


def _crop(cache: Cache | None, keep: int) -> None:
    """Roll a KV cache back to its first `keep` positions (those past it held rejected draft tokens)."""
    if cache is not None and cache.get_seq_length() > keep:
        cache.crop(keep - cache.get_seq_length())  # transformers 5: a negative count removes that many


def accept(
    drafted: Sequence[int], draft_probs: Sequence[torch.Tensor] | None, target_logits: torch.Tensor,
    sampler: Sampler, ids: torch.Tensor,
) -> tuple[int, int]:
    """How many of `drafted` the target accepts, and the token that follows them.

    target_logits: [len(drafted) + 1, vocab], the target's logits after the last emitted token and after each
    draft token. Greedy (`draft_probs` None): the longest prefix equal to the target's argmax, then its argmax.
    Sampling: each draft token by the rejection rule against `draft_probs` (the distribution each was drawn
    from), stopping at the first rejected, whose replacement comes from the normalized max(0, p - q); when all
    are accepted, the next token is drawn from the target's last distribution.
    """
    if draft_probs is None:
        predicted = target_logits.argmax(dim=-1).tolist()
        agreed = 0
        while agreed < len(drafted) and drafted[agreed] == predicted[agreed]:
            agreed += 1
        return agreed, predicted[agreed]
    p = sampler.distribution(ids.expand(len(target_logits), -1), target_logits)
    for i, (token, q) in enumerate(zip(drafted, draft_probs, strict=True)):
        if sampler.uniform() < min(1.0, float(p[i, token]) / float(q[token])):
            continue
        residual = (p[i] - q).clamp(min=0)
        # p = q leaves no residual: the rejection then has probability 0, so any distribution will do; p is exact.
        return i, sampler.draw((residual if float(residual.sum()) > 0 else p[i]).unsqueeze(0))[0]
    return len(drafted), sampler.draw(p[len(drafted)].unsqueeze(0))[0]


def speculative_generate(
    target: StreamingModel,
    draft: StreamingModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    k: int,
    sampler: Sampler,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    verify: str = "exact",
) -> tuple[Generation, SpeculativeStats]:
    """The target's tokens, greedy or sampled as `sampler` says, `k` drafted per verifying pass; `verify`: "exact"
    (each position as its own one-token step) or "batched" (one call over all). The target's timeline holds its
    passes only."""
    target.timeline, target.passes = Timeline(), 0
    prompt = list(prompt_ids)
    result = Generation(prompt_ids=prompt, start_s=target.clock(), timeline=target.timeline, prompts=[prompt])
    stats = SpeculativeStats()
    device = target.device
    target_cache = target.kv_policy.new_cache(target.config, device)
    draft_cache = draft.kv_policy.new_cache(draft.config, device)
    tokens = list(prompt)  # the prompt and every token emitted so far
    target_seen = draft_seen = 0  # positions each model's cache holds (the target's stays 0 without a cache)

    def emit(new: list[int]) -> bool:
        """Append `new` until EOS or the budget; True when generation is over."""
        now = target.clock()
        for token in new:
            tokens.append(token)
            result.generated_ids.append(token)
            result.token_times_s.append(now)
            if on_token is not None:
                on_token(token)
            if token in eos_token_ids or len(result.generated_ids) == max_new_tokens:
                return True
        return False

    def ids() -> torch.Tensor:
        return torch.tensor([tokens], device=device)

    first = sampler(ids(), target.forward(ids(), target_cache))[0]
    target_seen = len(tokens) if target_cache is not None else 0
    done = emit([first])
    while not done:
        # The draft catches up on what it has not seen, then proposes k tokens one by one.
        start = draft.clock()
        drafted: list[int] = []
        draft_probs: list[torch.Tensor] | None = [] if sampler.do_sample else None
        pending = tokens[draft_seen:]
        for _ in range(min(k, max_new_tokens - len(result.generated_ids))):
            logits = draft.forward(torch.tensor([pending], device=device), draft_cache)
            if draft_probs is None:
                drafted.append(int(logits.argmax(dim=-1)[0]))
            else:
                q = sampler.distribution(torch.tensor([tokens + drafted], device=device), logits)
                draft_probs.append(q[0])
                drafted.append(sampler.draw(q)[0])
            draft_seen += len(pending)
            pending = drafted[-1:]
        stats.draft_s += draft.clock() - start
        # One target pass over the newest token and the drafts; without a KV cache, over the whole sequence.
        if verify == "exact":
            if target_cache is not None:  # each token a one-token step, as greedy feeds them
                steps = [torch.tensor([[t]], device=device) for t in tokens[target_seen:] + drafted]
            else:  # each step the whole sequence so far, as greedy without a cache recomputes it
                steps = [torch.tensor([tokens + drafted[:j]], device=device) for j in range(len(drafted) + 1)]
            logits = target.forward_steps(steps, target_cache)
        else:
            joined = torch.tensor([tokens[target_seen:] + drafted], device=device)
            logits = target.forward(joined, target_cache, all_positions=True)[0]
        # The target's logits after the newest token and after each draft token.
        agreed, following = accept(drafted, draft_probs, logits[-(len(drafted) + 1):], sampler, ids())
        stats.drafted += len(drafted)
        stats.accepted += agreed
        stats.verify_passes += 1
        done = emit(drafted[:agreed] + [following])
        # Both caches keep every emitted token but the newest (the next pass's input); the rest is rejected.
        keep = len(tokens) - 1
        _crop(target_cache, keep)
        if target_cache is not None:
            target_seen = keep
        _crop(draft_cache, keep)
        draft_seen = min(draft_seen, keep)
    result.sequences = [result.generated_ids]
    result.kv_cache_bytes = cache_bytes(target_cache)
    result.kv_cache_tokens = int(target_cache.get_seq_length()) if target_cache is not None else 0
    result.metrics = stats.metrics(result)
    return result, stats
