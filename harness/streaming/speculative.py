"""Speculative decoding over the streamed target: a resident draft proposes k tokens, one streamed pass of
the target scores all of them, and the longest prefix the target agrees with is kept, plus the target's own
next token. A streamed pass costs about the same for one position or k + 1 (its bytes dominate), so each
accepted draft token saves most of a pass. Greedy and exact: the tokens are the target's greedy tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import Cache

from harness.measurement.timeline import Timeline
from harness.streaming.model import Generation, StreamingModel


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


def _argmax(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def speculative_generate(
    target: StreamingModel,
    draft: StreamingModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    k: int,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> tuple[Generation, SpeculativeStats]:
    """Greedy tokens of `target`, `k` drafted per verifying pass. The target's timeline holds its passes only."""
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

    first = _argmax(target.forward(torch.tensor([tokens], device=device), target_cache))[0]
    target_seen = len(tokens) if target_cache is not None else 0
    done = emit([first])
    while not done:
        # The draft catches up on what it has not seen, then proposes k tokens one by one.
        start = draft.clock()
        drafted: list[int] = []
        pending = tokens[draft_seen:]
        for _ in range(min(k, max_new_tokens - len(result.generated_ids))):
            drafted.append(_argmax(draft.forward(torch.tensor([pending], device=device), draft_cache))[0])
            draft_seen += len(pending)
            pending = drafted[-1:]
        stats.draft_s += draft.clock() - start
        # One target pass over the newest token and the drafts; without a KV cache, over the whole sequence.
        verify = tokens[target_seen:] + drafted
        logits = target.forward(torch.tensor([verify], device=device), target_cache, all_positions=True)[0]
        predicted = _argmax(logits[-(len(drafted) + 1):])  # the target's token after each of them
        agreed = 0
        while agreed < len(drafted) and drafted[agreed] == predicted[agreed]:
            agreed += 1
        stats.drafted += len(drafted)
        stats.accepted += agreed
        stats.verify_passes += 1
        done = emit(drafted[:agreed] + [predicted[agreed]])
        # Both caches keep every emitted token but the newest (the next pass's input); the rest is rejected.
        keep = len(tokens) - 1
        _crop(target_cache, keep)
        if target_cache is not None:
            target_seen = keep
        _crop(draft_cache, keep)
        draft_seen = min(draft_seen, keep)
    result.sequences = [result.generated_ids]
    result.metrics = stats.metrics(result)
    return result, stats
