"""Tokenizers for the evaluation tests: the shipped SentencePiece model and a small byte-level BPE
(the SmolLM2 / GPT-2 kind), trained in a second on the haystack."""

import pytest
import torch

from megatron_longgen.data.tokenizers import load_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sp_tokenizer():
    return load_tokenizer("builtin:tiny_sp")


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_longgen.evaluation.haystack import haystack_text

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    raw.train_from_iterator([haystack_text()[:200_000]], trainer=trainer)
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    ).save_pretrained(folder)
    return load_tokenizer(str(folder))


@pytest.fixture(params=["sp", "bpe"])
def tokenizer(request, sp_tokenizer, bpe_tokenizer):
    return sp_tokenizer if request.param == "sp" else bpe_tokenizer
