"""What compression, and a quantized KV cache, cost in accuracy, against the same model without them.

Teacher-forced, one pass per text, both models streamed through the same runner so the codec is
the only difference. Over the shipped texts (hundreds of positions): next-token top-1 agreement,
mean KL(uncompressed || compressed) and each text's perplexity under both. Over the run's own
prompt and generated tokens (a few positions): agreement and KL again, named `quality_run_*`.
Every figure says how many positions it covers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.checkpoints.tokenizer import CORPUS_PATH
from harness.config import Config
from harness.runners.layerbench.setup import Setup, build_setup, fresh_model
from harness.streaming.model import Generation, StreamingModel

# name -> file: `corpus` trains the embedded tokenizer; `essay` is prose it never saw.
TEXTS = {"corpus": CORPUS_PATH, "essay": CORPUS_PATH.with_name("essay.txt")}


def teacher_forced_logits(runner: StreamingModel, ids: list[int]) -> torch.Tensor:
    """[seq] token ids -> [seq, vocab] float32 logits, one pass, no KV cache."""
    return runner.forward(torch.tensor([ids], device=runner.device), cache=None, all_positions=True)[0].cpu()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    return float(torch.exp(F.cross_entropy(logits[:-1], targets)))


def _agreement_and_kl(ours: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: whether the top-1 tokens agree, and KL(ref || ours) in nats. ours, ref: [seq, vocab]."""
    log_p_ref, log_p_ours = F.log_softmax(ref, dim=-1), F.log_softmax(ours, dim=-1)
    kl = (log_p_ref.exp() * (log_p_ref - log_p_ours)).sum(dim=-1)
    return (ours.argmax(-1) == ref.argmax(-1)).float(), kl


def quality_metrics(
    runner: StreamingModel,
    reference: StreamingModel,
    run_ids: list[int],
    texts: Mapping[str, list[int]],
) -> dict[str, float]:
    """`texts`: name -> token ids; the first is the one `quality_ppl` names, the others `quality_ppl_<name>`."""
    agree, kl = _agreement_and_kl(teacher_forced_logits(runner, run_ids), teacher_forced_logits(reference, run_ids))
    metrics = {
        "quality_run_top1_agreement": float(agree.mean()),
        "quality_run_kl_mean": float(kl.mean()),
        "quality_run_positions": float(len(run_ids)),
    }
    agreements, kls = [], []
    for index, (name, ids) in enumerate(texts.items()):
        ours, ref = teacher_forced_logits(runner, ids), teacher_forced_logits(reference, ids)
        text_agree, text_kl = _agreement_and_kl(ours, ref)
        agreements.append(text_agree)
        kls.append(text_kl)
        suffix = "" if index == 0 else f"_{name}"
        metrics[f"quality_ppl{suffix}"] = perplexity(ours, ids)
        metrics[f"quality_ppl{suffix}_reference"] = perplexity(ref, ids)
        metrics["quality_text_tokens" if index == 0 else f"quality_{name}_tokens"] = float(len(ids))
    metrics.update(
        quality_top1_agreement=float(torch.cat(agreements).mean()),
        quality_kl_mean=float(torch.cat(kls).mean()),
        quality_positions=float(sum(len(ids) for ids in texts.values())),
    )
    return metrics


def text_ids(tokenizer: object, max_tokens: int) -> dict[str, list[int]]:
    """The shipped texts as token ids, each cut to `max_tokens`."""
    return {name: list(tokenizer(path.read_text())["input_ids"][:max_tokens]) for name, path in TEXTS.items()}


def compression_quality(setup: Setup, cfg: Config, gen: Generation, outputs_dir: Path) -> dict[str, float]:
    """The codec's cost in accuracy: the same runner over the uncompressed split of the same checkpoint."""
    plain = build_setup(cfg.uncompressed(), outputs_dir, setup.device)
    return quality_metrics(
        fresh_model(setup),
        fresh_model(plain),
        gen.prompt_ids + gen.generated_ids,
        # Never past the model's positions: the texts are longer than a small model's context.
        text_ids(setup.tokenizer, min(cfg.quality.max_tokens, setup.config.max_position_embeddings)),
    )


# Positions of each text decoded one at a time through the cache after its prefill: each attends to the whole
# stored past, as generation's tokens do. More cost more than they tell: a quantized cache dequantizes its whole
# past at every step.
KV_QUALITY_STEPS = 128


def cached_logits(model: StreamingModel, ids: list[int], cache: object) -> torch.Tensor:
    """Teacher-forced through a KV cache in one streamed pass: `ids` but its last KV_QUALITY_STEPS (at most half)
    as a prefill, then each token as a one-token step, as generation feeds them. -> [steps + 1, vocab] float32:
    the logits of every position from the prefill's last on (each predicting the token after it)."""
    prefill = max(1, len(ids) - min(KV_QUALITY_STEPS, len(ids) // 2))
    steps = [torch.tensor([ids[:prefill]], device=model.device)]
    steps += [torch.tensor([[token]], device=model.device) for token in ids[prefill:-1]]
    return model.forward_steps(steps, cache).cpu()


def kv_quality(setup: Setup, cfg: Config) -> dict[str, float]:
    """The KV cache's cost in accuracy: the same streamed model through the run's cache and through a plain one
    (kv_cache=device), over the shipped texts, with the newest positions attending to the stored past."""
    from transformers import DynamicCache

    model = fresh_model(setup)
    texts = text_ids(setup.tokenizer, min(cfg.quality.max_tokens, setup.config.max_position_embeddings))
    agreements, kls = [], []
    for ids in texts.values():
        ours = cached_logits(model, ids, model.kv_policy.new_cache(setup.config, setup.device))
        ref = cached_logits(model, ids, DynamicCache(config=setup.config))
        agree, kl = _agreement_and_kl(ours, ref)
        agreements.append(agree)
        kls.append(kl)
    return {
        "kv_quality_top1_agreement": float(torch.cat(agreements).mean()),
        "kv_quality_kl_mean": float(torch.cat(kls).mean()),
        "kv_quality_positions": float(sum(len(a) for a in agreements)),
    }
