"""Tokenizer files of an HF export (`checkpoint/hf_tokenizer.py`), against SentencePiece itself: a
Llama-2-style model (identity normalizer, no whitespace folding) is written as a plain LlamaTokenizer, a
model with another normalizer (the shipped NFKC + whitespace-folding `tiny_sp`) gets a tokenizer.json built
from its own settings; both reproduce SentencePiece's ids (BOS first) under `AutoTokenizer`. Tokenizers that
do not fit the model are skipped with a reason."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from megatron_longgen.checkpoint.hf_tokenizer import export_tokenizer
from megatron_longgen.data.tokenizers import Tokenizer, asset_path

TEXTS = [
    "Once upon a time, there was a little dog named Ada.",
    "Two  spaces,\ttabs and\nnew lines; digits 12345 and Über café.",
    " leading space and trailing space ",
]


def _llama_style_model(path):
    """`tiny_sp` with Llama-2's normalizer settings: no NFKC map, no whitespace folding."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(asset_path("tiny_sp.model").read_bytes())
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.remove_extra_whitespaces = False
    path.write_bytes(proto.SerializeToString())
    return path


def _hf_ids(folder, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).encode(text)


def test_llama_style_sentencepiece_reproduces_its_ids(tmp_path):
    model = _llama_style_model(tmp_path / "llama_style.model")
    out = tmp_path / "out"
    out.mkdir()
    result = export_tokenizer(str(model), out, model_vocab_size=1024, explicit=True, max_length=4096)
    assert result.warnings == []
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(result.files)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    ours = Tokenizer(str(model))
    for text in TEXTS:
        assert _hf_ids(out, text) == ours.encode(text, add_bos=True), text


def test_without_transformers_a_llama_tokenizer_config_is_written(tmp_path, monkeypatch):
    """The exporter does not need transformers: tokenizer.model + a LlamaTokenizer config (BOS, no EOS)."""
    from megatron_longgen.utils import optional

    monkeypatch.setattr(optional, "has_transformers", lambda: False)
    model = _llama_style_model(tmp_path / "llama_style.model")
    out = tmp_path / "out"
    out.mkdir()
    result = export_tokenizer(str(model), out, model_vocab_size=1024, explicit=True, max_length=4096)
    assert result.warnings == []
    assert result.files == ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (
        config["tokenizer_class"] == "LlamaTokenizer"
        and config["add_bos_token"]
        and not config["add_eos_token"]
    )
    assert config["model_max_length"] == 4096
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()


def test_other_normalizers_get_a_faithful_tokenizer_json(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = export_tokenizer("builtin:tiny_sp", out, model_vocab_size=1024, explicit=False, max_length=4096)
    assert result.warnings == []
    assert "tokenizer.json" in result.files and "tokenizer.model" in result.files
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    ours = Tokenizer("builtin:tiny_sp")
    for text in TEXTS:
        assert _hf_ids(out, text) == ours.encode(text, add_bos=True), text


def test_hf_folder_is_copied(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    export_tokenizer("builtin:tiny_sp", first, model_vocab_size=1024, explicit=False, max_length=4096)
    (first / "unrelated.bin").write_bytes(b"not a tokenizer file")
    out = tmp_path / "out"
    out.mkdir()
    result = export_tokenizer(str(first), out, model_vocab_size=1024, explicit=True, max_length=4096)
    assert result.warnings == [] and "unrelated.bin" not in result.files
    assert all((out / name).read_bytes() == (first / name).read_bytes() for name in result.files)
    assert _hf_ids(out, TEXTS[1]) == Tokenizer("builtin:tiny_sp").encode(TEXTS[1], add_bos=True)


@pytest.mark.parametrize(
    ("spec", "rows", "explicit", "reason"),
    [
        (None, 1024, False, "the checkpoint's config names none"),
        (
            "builtin:tiny_sp",
            32000,
            False,
            "builtin:tiny_sp has 1024 tokens but the model has 32000 embedding rows",
        ),
        (
            "builtin:tiny_sp",
            100,
            True,
            "builtin:tiny_sp has 1024 tokens but the model has 100 embedding rows",
        ),
        ("/nonexistent/tok.model", 1024, False, "unknown tokenizer '/nonexistent/tok.model'"),
    ],
)
def test_unusable_tokenizers_are_skipped_with_the_reason(tmp_path, spec, rows, explicit, reason):
    result = export_tokenizer(spec, tmp_path, model_vocab_size=rows, explicit=explicit, max_length=64)
    assert result.files == [] and list(tmp_path.iterdir()) == []
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith(f"no tokenizer written: {reason}")
    assert result.warnings[0].endswith(
        "pass --tokenizer PATH (a SentencePiece .model or an HF tokenizer folder) to include one"
    )


def test_explicit_smaller_tokenizer_is_accepted(tmp_path):
    # A model with padded rows (e.g. 1,024 tokens in 1,152 rows) takes its tokenizer when it is named.
    result = export_tokenizer(
        "builtin:tiny_sp", tmp_path, model_vocab_size=1152, explicit=True, max_length=64
    )
    assert result.warnings == [] and "tokenizer.model" in result.files
