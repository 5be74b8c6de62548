"""Tokenizer files for an exported HF folder, so `AutoTokenizer.from_pretrained(OUT)` works.

The tokenizer is the training config's `data.tokenizer` (or the exporter's `--tokenizer PATH`):
- a SentencePiece `.model` (Llama-2's format, `builtin:tiny_sp`): copied as `tokenizer.model`, with a
  `LlamaTokenizer` `tokenizer_config.json` + `special_tokens_map.json` (BOS added, no EOS: how the
  training data was tokenized). Needs nothing beyond sentencepiece at export time. Where transformers is
  installed the result is loaded back and compared with SentencePiece on a probe text. HF's Llama
  conversion hard-codes Llama-2's normalizer and, in transformers 5, drops the dummy prefix of a text
  that starts with a space; when the ids differ (that, or another normalizer such as `tiny_sp`'s NFKC +
  whitespace folding), a `tokenizer.json` built from the model's own settings (transformers'
  `SpmConverter.build_tokenizer_from_spm_proto`, BOS added by its post-processor, class
  `PreTrainedTokenizerFast`) replaces the Llama config, and is checked the same way;
- a Hugging Face tokenizer folder: its tokenizer files are copied.

A tokenizer whose vocabulary does not fit the model is not written (a warning says why): more tokens
than embedding rows never fits; a different count is accepted only for an explicit `--tokenizer` (the
config's default `builtin:tiny_sp` must not end up next to a converted 32000-token Llama).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_PROBE = " Once upon a time,  there was\ta little dog.\nHello world 1234! Über café, 日本語.  "


@dataclass
class TokenizerExport:
    """What `export_tokenizer` did: the files written (empty if none) and the warnings to show."""

    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str | None = None


def export_tokenizer(
    spec: str | None, out: str | os.PathLike, *, model_vocab_size: int, explicit: bool, max_length: int
) -> TokenizerExport:
    """Write the tokenizer files for `spec` into `out` (see the module docstring); never raises for an
    unusable tokenizer (the export is still valid without one): the reason is in `.warnings`."""
    from megatron_longgen.data.tokenizers import BUILTIN_TOKENIZERS, Tokenizer, resolve_builtin

    result = TokenizerExport(source=spec)
    hint = "pass --tokenizer PATH (a SentencePiece .model or an HF tokenizer folder) to include one"
    if not spec:
        result.warnings.append(f"no tokenizer written: the checkpoint's config names none; {hint}")
        return result
    try:
        path = Path(resolve_builtin(spec, BUILTIN_TOKENIZERS, "tokenizer"))
        tokenizer = Tokenizer(spec)
    except (ValueError, ImportError, OSError) as err:
        result.warnings.append(f"no tokenizer written: {err}; {hint}")
        return result
    if tokenizer.vocab_size > model_vocab_size or (not explicit and tokenizer.vocab_size != model_vocab_size):
        result.warnings.append(
            f"no tokenizer written: {spec} has {tokenizer.vocab_size} tokens but the model has "
            f"{model_vocab_size} embedding rows; {hint}"
        )
        return result
    out = Path(out)
    if path.is_dir():
        for name in HF_TOKENIZER_FILES:
            if (path / name).is_file():
                shutil.copyfile(path / name, out / name)
                result.files.append(name)
        return result
    _write_sentencepiece(path, out, max_length=max_length)
    result.warnings += _check_fidelity(path, out)
    result.files = [name for name in HF_TOKENIZER_FILES if (out / name).is_file()]
    return result


def check_explicit_tokenizer(spec: str, *, model_vocab_size: int) -> None:
    """Raise ValueError when a tokenizer the user named cannot be exported with this model (checked
    before any conversion work)."""
    from megatron_longgen.data.tokenizers import Tokenizer

    vocab = Tokenizer(spec).vocab_size  # ValueError naming the spec when it is not a tokenizer
    if vocab > model_vocab_size:
        raise ValueError(
            f"--tokenizer {spec} has {vocab} tokens but the model has only {model_vocab_size} embedding rows; "
            "pass the tokenizer the model was trained with"
        )


def _write_sentencepiece(model: Path, out: Path, *, max_length: int) -> None:
    """tokenizer.model + a LlamaTokenizer config naming the model's own special pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(model))

    def piece(index: int) -> str | None:
        return sp.IdToPiece(index) if index >= 0 else None

    special = {
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
    }
    if sp.pad_id() >= 0:
        special["pad_token"] = piece(sp.pad_id())
    special = {k: v for k, v in special.items() if v is not None}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,  # every training document starts with <bos> (data/preprocess.py)
        "add_eos_token": False,
        "legacy": True,  # Llama-2 normalization (dummy prefix, spaces to U+2581), as SentencePiece does
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "sp_model_kwargs": {},
    }
    shutil.copyfile(model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _sentencepiece_ids(model: Path, text: str) -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(model))
    return [sp.bos_id(), *sp.EncodeAsIds(text)]


def _hf_ids(folder: Path, text: str) -> list[int] | str:
    """Token ids of `text` from `AutoTokenizer.from_pretrained(folder)`, or why it did not load."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the folder's config.json names a model type transformers does not know
    try:
        return list(AutoTokenizer.from_pretrained(str(folder), local_files_only=True).encode(text))
    except Exception as err:  # noqa: BLE001  (any failure to load is reported, not raised: the weights are fine)
        return f"{type(err).__name__}: {err}"
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_fidelity(model: Path, out: Path) -> list[str]:
    """Load the written files with transformers (when installed) and compare with SentencePiece; switch to
    a tokenizer.json built from the model's own settings when the Llama conversion differs."""
    from megatron_longgen.utils.optional import has_transformers

    if not has_transformers():
        return []
    expected = _sentencepiece_ids(model, _PROBE)
    got = _hf_ids(out, _PROBE)
    if got == expected:
        return []
    if _write_tokenizer_json(model, out):
        got = _hf_ids(out, _PROBE)
        if got == expected:
            return []
    why = got if isinstance(got, str) else "different ids"
    message = (
        f"the exported tokenizer does not reproduce {model.name}'s token ids under transformers ({why}); "
        "use SentencePiece with tokenizer.model"
    )
    return [message]


def _write_tokenizer_json(model: Path, out: Path) -> bool:
    """A tokenizers-backed tokenizer built from the SentencePiece model's own normalizer and merges (BOS
    added by a post-processor); False when this transformers lacks the builder."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        return False
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    backend = SpmConverter.build_tokenizer_from_spm_proto(
        proto, {p.piece: i for i, p in enumerate(proto.pieces)}
    )
    if backend is None:
        return False
    sp = spm.SentencePieceProcessor()
    sp.Load(str(model))
    special = json.loads((out / "special_tokens_map.json").read_text())
    bos = special["bos_token"]
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    max_length = json.loads((out / "tokenizer_config.json").read_text()).get("model_max_length")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **special)
    fast.save_pretrained(str(out))
    # transformers 5 records its new class name; the old one loads the same file in 4.x and 5.x alike.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True
