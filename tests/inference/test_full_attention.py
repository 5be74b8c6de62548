"""An all-F LongGen model reproduces transformers' own LlamaForCausalLM (logits and generation)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.inference.reference import left_pad, tiny_config, tiny_model


@pytest.fixture(scope="module")
def pair():
    ours = tiny_model(tiny_config(layer_pattern="FFF", kv_heads=2), seed=31)
    fields = ours.config.to_dict()
    for key in ("longgen", "model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    theirs = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@torch.no_grad()
def test_logits_match(pair):
    ours, theirs = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    a, b = ours(ids, use_cache=False).logits, theirs(ids, use_cache=False).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


@torch.no_grad()
def test_greedy_and_sampled_generation_match(pair):
    ours, theirs = pair
    gen = torch.Generator().manual_seed(1)
    ids, mask = left_pad([torch.randint(0, ours.config.vocab_size, (n,), generator=gen) for n in (23, 11)])
    kwargs = {"attention_mask": mask, "max_new_tokens": 30, "pad_token_id": 0}
    assert torch.equal(
        ours.generate(ids, do_sample=False, **kwargs), theirs.generate(ids, do_sample=False, **kwargs)
    )
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, **kwargs}
    torch.manual_seed(5)
    mine = ours.generate(ids, **sampling)
    torch.manual_seed(5)
    assert torch.equal(mine, theirs.generate(ids, **sampling))
