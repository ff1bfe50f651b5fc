"""What compression costs in accuracy, against the uncompressed model on the same checkpoint.

Teacher-forced on the run's own tokens (prompt + generated): next-token top-1 agreement
and mean KL(uncompressed || compressed); and perplexity of both on a text shipped with
the package. Both models stream through the same runner, so the codec is the only difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.checkpoints.tokenizer import CORPUS_PATH
from harness.runner.streaming import LayerStreamingRunner


def teacher_forced_logits(runner: LayerStreamingRunner, ids: list[int]) -> torch.Tensor:
    """[seq] token ids -> [seq, vocab] float32 logits, one pass, no KV cache."""
    return runner.forward(torch.tensor([ids], device=runner.device), cache=None, all_positions=True)[0].cpu()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    return float(torch.exp(F.cross_entropy(logits[:-1], targets)))


def quality_metrics(
    runner: LayerStreamingRunner, reference: LayerStreamingRunner, run_ids: list[int], text_ids: list[int]
) -> dict[str, float]:
    ours, ref = teacher_forced_logits(runner, run_ids), teacher_forced_logits(reference, run_ids)
    log_p_ref, log_p_ours = F.log_softmax(ref, dim=-1), F.log_softmax(ours, dim=-1)
    kl = (log_p_ref.exp() * (log_p_ref - log_p_ours)).sum(dim=-1)  # [seq]
    text_ours, text_ref = teacher_forced_logits(runner, text_ids), teacher_forced_logits(reference, text_ids)
    return {
        "quality_top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
        "quality_kl_mean": float(kl.mean()),
        "quality_ppl": perplexity(text_ours, text_ids),
        "quality_ppl_reference": perplexity(text_ref, text_ids),
        "quality_text_tokens": float(len(text_ids)),
    }


def corpus_ids(tokenizer: object, max_tokens: int) -> list[int]:
    return list(tokenizer(CORPUS_PATH.read_text())["input_ids"][:max_tokens])
