"""The embedded models' tokenizer: a small byte-level BPE trained here on harness/data/corpus.txt.

It uses Llama-3's pre-tokenizer, special tokens and chat template, so the generated checkpoints
tokenize text the way Meta's do, only with a 1024-token vocabulary. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"

# Llama-3's own pre-tokenizer split: it decides which byte sequences BPE may merge, so our tiny vocab
# segments text the way the real 128k vocab does (digits in groups of 3, contractions, leading spaces).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
# Llama-3.1's first special tokens in their order, then a few reserved ones; like Llama-3 they sit after
# the BPE vocab, so ids are BPE_VOCAB_SIZE + position.
SPECIAL_TOKENS = [
    BOS,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOM,
    EOT,
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 8)),
]
BPE_VOCAB_SIZE = 1008  # 256 byte symbols + 752 merges; with the 16 specials the vocab is 1024
VOCAB_SIZE = BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)
SPECIAL_IDS = {token: BPE_VOCAB_SIZE + i for i, token in enumerate(SPECIAL_TOKENS)}
# generation stops on any of these, as in Llama-3.1-Instruct's generation_config.json
STOP_TOKENS = [END_OF_TEXT, EOM, EOT]

# Meta's Llama-3-Instruct template, verbatim.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([CORPUS_PATH.read_text(encoding="utf-8")], trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"{CORPUS_PATH} is too small to learn {BPE_VOCAB_SIZE} BPE tokens")
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert all(tok.token_to_id(t) == i for t, i in SPECIAL_IDS.items())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, SPECIAL_IDS[BOS])]
    )
    # eos is <|eot_id|>, as in Llama-3-Instruct: it ends every assistant turn in the chat template, so chat
    # generation stops where an instruct model would; generation_config also lists <|end_of_text|>.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keeps decode(encode(text)) == text
    )
