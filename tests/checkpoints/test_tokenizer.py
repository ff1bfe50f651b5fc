"""harness.checkpoints.tokenizer: the local BPE tokenizer is deterministic, lays out its special tokens, and
renders the Llama 3 chat template."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel

from harness.checkpoints.tokenizer import BOS, CORPUS_PATH, EOT, SPECIAL_TOKENS, build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tokenizer_is_deterministic_across_builds_and_processes(tokenizer):
    text = CORPUS_PATH.read_text()[:2000]
    again = build_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert again(text).input_ids == tokenizer(text).input_ids
    # The BPE trainer is Rust code with hash maps; a fresh process is what would expose any randomness.
    code = (
        "import hashlib; from harness.checkpoints.tokenizer import build_tokenizer; "
        "print(hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_tokenizer_layout_and_special_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == 1024
    assert set(ByteLevel.alphabet()) <= set(vocab), "every byte must have its own symbol"
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOT
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]
    ids = tokenizer("Hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer("a", "b").input_ids.count(tokenizer.bos_token_id) == 2
    text = "Café prices rose 3.5% in 2024, didn't they?\n\n  Yes. <|eot_id|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    corpus = CORPUS_PATH.read_text()
    assert len(tokenizer.encode(corpus)) < len(corpus) / 2.5, "BPE should compress English prose"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Why is the sky blue? "},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhy is the sky blue?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id, "exactly one BOS"
    header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert ids.count(header) == 3 and ids.count(tokenizer.eos_token_id) == 2
