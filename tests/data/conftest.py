"""Fixtures for the data tests: the shipped tokenizer, small generated corpora, and a 1-rank gloo group."""

from __future__ import annotations

import json
import random

import pytest
import torch.distributed as dist

from megatron_longgen.data.tokenizers import load_tokenizer

WORDS = [
    "Ada",
    "walked",
    "to",
    "Oslo",
    "with",
    "a",
    "red",
    "kite",
    "and",
    "the",
    "owl",
    "sang",
    "softly",
    ".",
]


def make_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def write_jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("builtin:tiny_sp")


@pytest.fixture(scope="module")
def gloo_group():
    """A 1-rank gloo process group for Megatron-Core's BlendedDataset; left alone if one already exists."""
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        created = True
    yield
    if created:
        dist.destroy_process_group()
