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
from dataclasses import dataclass, field

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
        """Per pass, the whole batch's tokens; per token, a sequence's (the batch's mean)."""
        passes = self.verify_passes + 1  # and the prefill, which verified nothing
        elapsed = generation.token_times_s[-1] - generation.start_s
        tokens = sum(len(s) for s in generation.sequences)
        out = {
            "spec_passes_per_token": passes / (tokens / len(generation.sequences)),
            "spec_draft_share": self.draft_s / elapsed if elapsed > 0 else 0.0,
        }
        if self.drafted:
            out["spec_accepted_share"] = self.accepted / self.drafted
            out["spec_accepted_per_pass"] = self.accepted / self.verify_passes
            # Each pass's emitted tokens across the batch: its accepted drafts and one of the target's per sequence.
            out["spec_tokens_per_pass"] = (tokens - len(generation.sequences)) / self.verify_passes
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


@dataclass
class _Sequence:
    """One sequence of the batch: its tokens, its own KV caches, and how far each cache has seen them."""

    tokens: list[int]
    target_cache: Cache | None
    draft_cache: Cache | None
    generated: list[int] = field(default_factory=list)
    target_seen: int = 0  # positions the target's cache holds (stays 0 without a cache)
    draft_seen: int = 0
    done: bool = False


def speculative_generate(
    target: StreamingModel,
    draft: StreamingModel,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    k: int,
    sampler: Sampler,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    verify: str = "exact",
) -> tuple[Generation, SpeculativeStats]:
    """The target's tokens, greedy or sampled as `sampler` says, `k` drafted per verifying pass; `verify`: "exact"
    (each position as its own one-token step) or "batched" (one call over all, one sequence only). The target's
    timeline holds its passes only.

    `prompt_ids`: one prompt, or several. Each sequence of a batch drafts, is verified and accepts on its own, with
    caches of its own, and all are verified in one streamed pass: its tokens are those it would get alone. Token
    i of the batch is timed when every sequence has its i-th token (or has ended), as a batch's greedy step is.
    """
    target.timeline, target.passes = Timeline(), 0
    prompts = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    if len(prompts) > 1 and verify != "exact":
        raise ValueError("decoding.verify=batched verifies one sequence: a batch needs decoding.verify=exact")
    result = Generation(prompt_ids=prompts[0], start_s=target.clock(), timeline=target.timeline, prompts=prompts)
    stats = SpeculativeStats()
    device = target.device
    # Each sequence's tokens are a copy: its prompt stays the generation's (and the workload's) as it was.
    batch = [
        _Sequence(list(prompt), target.kv_policy.new_cache(target.config, device),
                  draft.kv_policy.new_cache(draft.config, device))
        for prompt in prompts
    ]

    def emit(seq: _Sequence, new: list[int]) -> None:
        """Append `new` until EOS or the budget."""
        for token in new:
            seq.tokens.append(token)
            seq.generated.append(token)
            if token in eos_token_ids or len(seq.generated) == max_new_tokens:
                seq.done = True
                return

    def timed() -> None:
        """A time for each batch token every sequence now has (an ended one has them all)."""
        now = target.clock()
        have = min((len(seq.generated) for seq in batch if not seq.done), default=max_new_tokens)
        have = min(have, max(len(seq.generated) for seq in batch))
        while len(result.token_times_s) < have:
            result.token_times_s.append(now)
            if on_token is not None:
                first = batch[0].generated
                on_token(first[min(len(result.token_times_s), len(first)) - 1])

    def ids(seq: _Sequence) -> torch.Tensor:
        return torch.tensor([seq.tokens], device=device)

    # The prefill: every prompt whole, each with its own cache, in one streamed pass.
    logits = target.forward_steps([ids(seq) for seq in batch], caches=[seq.target_cache for seq in batch])
    for seq, row in zip(batch, logits, strict=True):
        seq.target_seen = len(seq.tokens) if seq.target_cache is not None else 0
        emit(seq, sampler(ids(seq), row.unsqueeze(0)))
    timed()
    while not all(seq.done for seq in batch):
        active = [seq for seq in batch if not seq.done]
        # Each sequence's draft catches up on what it has not seen, then proposes up to k tokens one by one.
        start = draft.clock()
        proposals = []
        for seq in active:
            drafted: list[int] = []
            draft_probs: list[torch.Tensor] | None = [] if sampler.do_sample else None
            pending = seq.tokens[seq.draft_seen:]
            for _ in range(min(k, max_new_tokens - len(seq.generated))):
                logits = draft.forward(torch.tensor([pending], device=device), seq.draft_cache)
                if draft_probs is None:
                    drafted.append(int(logits.argmax(dim=-1)[0]))
                else:
                    q = sampler.distribution(torch.tensor([seq.tokens + drafted], device=device), logits)
                    draft_probs.append(q[0])
                    drafted.append(sampler.draw(q)[0])
                seq.draft_seen += len(pending)
                pending = drafted[-1:]
            proposals.append((drafted, draft_probs))
        stats.draft_s += draft.clock() - start
        # One target pass over every sequence's newest token and drafts; without a KV cache, over each sequence.
        steps, caches, counts = [], [], []
        for seq, (drafted, _) in zip(active, proposals, strict=True):
            if verify != "exact":
                seq_steps = [torch.tensor([seq.tokens[seq.target_seen:] + drafted], device=device)]
            elif seq.target_cache is not None:  # each token a one-token step, as greedy feeds them
                seq_steps = [torch.tensor([[t]], device=device) for t in seq.tokens[seq.target_seen:] + drafted]
            else:  # each step the whole sequence so far, as greedy without a cache recomputes it
                seq_steps = [torch.tensor([seq.tokens + drafted[:j]], device=device) for j in range(len(drafted) + 1)]
            steps += seq_steps
            caches += [seq.target_cache] * len(seq_steps)
            counts.append(len(seq_steps))
        if verify == "exact":
            logits = target.forward_steps(steps, caches=caches)
        else:
            logits = target.forward(steps[0], caches[0], all_positions=True)[0]
        stats.verify_passes += 1
        offset = 0
        for seq, (drafted, draft_probs), count in zip(active, proposals, counts, strict=True):
            rows = logits[offset : offset + count] if verify == "exact" else logits
            offset += count
            # The target's logits after the newest token and after each draft token.
            agreed, following = accept(drafted, draft_probs, rows[-(len(drafted) + 1):], sampler, ids(seq))
            stats.drafted += len(drafted)
            stats.accepted += agreed
            emit(seq, drafted[:agreed] + [following])
            # Both caches keep every emitted token but the newest (the next pass's input); the rest is rejected.
            keep = len(seq.tokens) - 1
            _crop(seq.target_cache, keep)
            if seq.target_cache is not None:
                seq.target_seen = keep
            _crop(seq.draft_cache, keep)
            seq.draft_seen = min(seq.draft_seen, keep)
        timed()
    result.sequences = [seq.generated for seq in batch]
    result.generated_ids = result.sequences[0]
    result.kv_cache_bytes = sum(cache_bytes(seq.target_cache) for seq in batch)
    result.kv_cache_tokens = sum(int(seq.target_cache.get_seq_length()) for seq in batch if seq.target_cache)
    result.metrics = stats.metrics(result)
    return result, stats
