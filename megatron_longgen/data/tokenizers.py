"""Tokenizers: SentencePiece `.model` files (the Llama-2 format), Hugging Face tokenizer folders (e.g. the
byte-level BPE of GPT-2, Llama-3 or SmolLM2), and the small SentencePiece model that ships with the package
(`builtin:tiny_sp`).

All of them are wrapped in `Tokenizer`, which has what the data pipeline and Megatron-Core's datasets need:
`encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, and the Megatron duck-typed `eod`, `pad` and
`unique_identifiers`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_TOKENIZERS = {"tiny_sp": "tiny_sp.model"}
BUILTIN_CORPORA = {"tiny_stories": "tiny_stories.txt"}


def asset_path(name: str) -> Path:
    """Path of a file in megatron_longgen/assets."""
    return Path(str(resources.files("megatron_longgen") / "assets" / name))


def resolve_builtin(spec: str, table: dict[str, str], kind: str) -> str:
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    key = spec[len(BUILTIN_PREFIX) :]
    if key not in table:
        raise ValueError(
            f"unknown built-in {kind} {spec!r}; available: {[BUILTIN_PREFIX + k for k in table]}"
        )
    return str(asset_path(table[key]))


class Tokenizer:
    """A SentencePiece or HF tokenizer behind one small interface."""

    def __init__(self, spec: str):
        path = resolve_builtin(spec, BUILTIN_TOKENIZERS, "tokenizer")
        self.spec = spec
        self.path = path
        if os.path.isfile(path) and path.endswith(".model"):
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(path)
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"{path} is not a valid SentencePiece model: {exc}") from exc
            self._hf = None
            self.vocab_size = self._sp.GetPieceSize()
            self.bos_id = self._sp.bos_id()
            self.eos_id = self._sp.eos_id()
        elif os.path.isdir(path):
            from megatron_longgen.utils.optional import require

            require("transformers", feature="loading a Hugging Face tokenizer")
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path} does not hold a Hugging Face tokenizer: {exc}") from exc
            self._sp = None
            self.vocab_size = len(self._hf)
            self.bos_id = self._hf.bos_token_id
            self.eos_id = self._hf.eos_token_id
        else:
            raise ValueError(
                f"unknown tokenizer {spec!r}: expected a SentencePiece .model file, a Hugging Face tokenizer "
                f"folder, or one of {[BUILTIN_PREFIX + k for k in BUILTIN_TOKENIZERS]}"
            )
        if self.bos_id is None or self.bos_id < 0:
            raise ValueError(f"tokenizer {spec!r} has no <bos> token; LongGen marks document starts with it")

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text` as plain text, with `<bos>` in front when `add_bos`.

        Special-token strings inside the text (e.g. a source file that spells `"<|endoftext|>"`) are
        tokenized as ordinary characters, never turned into the special ids (which could be the document
        separator): SentencePiece does this by itself, HF tokenizers need `split_special_tokens`. No length
        warning: documents are longer than any model_max_length by design.
        """
        if self._sp is not None:
            ids = self._sp.EncodeAsIds(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False, split_special_tokens=True, verbose=False)
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; for byte-level BPE the exact inverse of `encode` (no clean-up of spaces)."""
        if self._sp is not None:
            return self._sp.DecodeIds(list(ids))
        return self._hf.decode(list(ids), clean_up_tokenization_spaces=False)

    # Megatron-Core GPTDataset duck typing.
    @property
    def eod(self) -> int:
        return self.eos_id if self.eos_id is not None and self.eos_id >= 0 else self.bos_id

    @property
    def pad(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        return {
            "class": "megatron_longgen.Tokenizer",
            "path": os.path.abspath(self.path),
            "vocab": self.vocab_size,
        }


def load_tokenizer(spec: str) -> Tokenizer:
    """Load `builtin:tiny_sp`, a `.model` file, or an HF tokenizer folder."""
    return Tokenizer(spec)
