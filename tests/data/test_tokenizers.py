"""HF byte-level BPE tokenizer folders: the `Tokenizer` wrapper and tools/preprocess_data.py, checked against
the `tokenizers` library itself (the oracle), with a tokenizer trained in the test (tests/data/byte_bpe.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_longgen.data.indexed import read_document_lengths, validate_indexed_prefix
from megatron_longgen.data.tokenizers import Tokenizer
from tests.data.byte_bpe import SPECIAL_TOKENS, save_hf_tokenizer, train_raw_tokenizer
from tests.data.conftest import write_jsonl

pytest.importorskip("transformers")

TRICKY = [
    "def f(x):\n\treturn x  # two spaces, a tab\n\n\n",
    "  leading and trailing spaces  ",
    "Zürich, naïve café — 東京 🚀 ½",
    "Hello , world . It 's ( a ) test ; don't clean spaces",
    "digits 0123456789 and 3.14159e-10",
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def raw():
    return train_raw_tokenizer()


def test_loads_with_vocab_and_bos(hf_folder, raw):
    tok = Tokenizer(str(hf_folder))
    assert tok.vocab_size == raw.get_vocab_size() == 400
    assert (tok.bos_id, tok.eos_id) == (0, 2)
    assert tok.unique_identifiers["vocab"] == 400


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_tokenizers_and_round_trips(hf_folder, raw, text):
    tok = Tokenizer(str(hf_folder))
    ids = tok.encode(text)
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_bos=True) == [0] + ids
    assert tok.decode(ids) == text  # byte-level BPE is lossless; no space clean-up


def test_special_token_strings_in_documents_stay_text(hf_folder):
    tok = Tokenizer(str(hf_folder))
    text = 'eos = "<|endoftext|>"; chat = "<|im_start|>user"'
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2}, "a literal special-token string became a special id"
    assert tok.decode(ids) == text


def test_long_documents_give_no_length_warning(hf_folder, capfd):
    tok = Tokenizer(str(hf_folder))  # model_max_length 64
    ids = tok.encode("word " * 500)
    assert len(ids) > 64
    assert "sequence length" not in capfd.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_data_cli_with_byte_level_bpe(hf_folder, raw, tmp_path, workers):
    from tools.preprocess_data import main

    texts = TRICKY + ['literal "<|endoftext|>" in code'] + ["x = 1\n" * 300]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    prefix = str(tmp_path / "out")
    stats = main(
        [
            "--input",
            path,
            "--tokenizer",
            str(hf_folder),
            "--output-prefix",
            prefix,
            "--workers",
            str(workers),
            "--no-progress",
        ]
    )
    info = validate_indexed_prefix(prefix)
    assert np.dtype(info.dtype) == np.uint16
    flat = np.fromfile(prefix + ".bin", dtype=info.dtype).tolist()
    bounds = np.concatenate([[0], np.cumsum(read_document_lengths(prefix))])
    docs = [flat[bounds[i] : bounds[i + 1]] for i in range(len(texts))]
    for text, doc in zip(texts, docs):
        if "<|" in text:  # the oracle would parse the special string; ours must keep it as text
            assert doc[0] == 0 and not set(doc[1:]) & {0, 1, 2}
        else:
            assert doc == [0] + raw.encode(text, add_special_tokens=False).ids
    assert (stats["vocab_size"], stats["bos_id"]) == (400, 0)
    recorded = json.loads((tmp_path / "out.stats.json").read_text())
    assert recorded["tokenizer"] == str(hf_folder)


def test_special_tokens_are_the_first_ids(raw):
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
