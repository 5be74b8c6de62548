"""A tiny byte-level BPE tokenizer (the GPT-2 / Llama-3 / SmolLM2 kind), trained in a second with `tokenizers`.

Shared by the tokenizer tests and the SmolLM2 pipeline test. Like SmolLM2's, its first ids are the special
tokens `<|endoftext|>` (0, used as `<bos>`: the document separator), `<|im_start|>` (1) and `<|im_end|>` (2).
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

TRAINING_TEXT = [
    "def attention(query, key, value):\n    return softmax(query @ key.T) @ value\n",
    "The quick brown fox jumps over the lazy dog. Numbers: 12345 67890.",
    "class Model:\n\tdef __init__(self, width=64):\n\t\tself.width = width  # tabs too\n",
    "Licences grant permission to use, copy, modify and distribute this software.",
    "record 5f3a91 -> value 2841937\nLookup: which value does record 5f3a91 hold? 2841937",
]


def train_raw_tokenizer(*, vocab_size: int = 400, texts: list[str] | None = None):
    """A `tokenizers.Tokenizer`: ByteLevel pre-tokenizer and decoder, BPE over all 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator((texts or TRAINING_TEXT) * 20, trainer)
    return raw


def save_hf_tokenizer(folder: Path, *, vocab_size: int = 400, model_max_length: int = 64) -> Path:
    """Train the tokenizer and save it as a Hugging Face tokenizer folder (bos `<|endoftext|>`); returns
    `folder`. `model_max_length` is small on purpose: long documents must not trigger length warnings."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=train_raw_tokenizer(vocab_size=vocab_size),
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[2],
        model_max_length=model_max_length,
    ).save_pretrained(folder)
    return folder
