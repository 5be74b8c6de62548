"""LongGenCache as a transformers Cache: sizes, growth, generate() integration, beam reordering, errors."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from megatron_longgen.inference.kv_cache import LongGenCache
from tests.inference.reference import oracle_logits, oracle_model, tiny_config, tiny_model

TOL = 2e-5


def _cache_of(output):
    return output.cache if hasattr(type(output), "cache") else output.past_key_values


@pytest.fixture(scope="module", params=["sink_window", "block_strided"])
def model(request):
    return tiny_model(tiny_config(variant=request.param), seed=21)


@torch.no_grad()
def test_bytes_per_layer_kind(model):
    """At 200 tokens: full layers hold 200 + reserve slots, sparse ones their bounded set."""
    ids = torch.randint(0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(max_cache_len=210)
    model(ids, cache=cache)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 200 and cache.lengths == [200, 200]
    per_slot = 2 * 2 * model.config.num_key_value_heads * 16 * 4  # K and V, 2 rows, G heads, dim 16, fp32
    layout = cache.kind_of(0).layout
    sparse_slots = layout.capacity(210)
    expected = {"full": 2 * 210 * per_slot, layout.name: 2 * sparse_slots * per_slot}
    assert cache.nbytes_by_kind() == expected and cache.nbytes() == sum(expected.values())
    # Sparse layers: 16 slots for sink_window (1 sink + 3 window blocks of 4), 8 + 17 stride blocks for
    # block_strided; the keys still in use are counted separately.
    assert sparse_slots == (16 if layout.name == "sink_window" else (2 + 18) * 4)
    used = cache.used_slots()
    assert used["full"] == [200, 200] and max(used[layout.name]) <= sparse_slots


@torch.no_grad()
def test_buffers_grow_when_the_reserve_is_exceeded(model):
    ref = oracle_model(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(1))
    expected = oracle_logits(ref, ids)
    cache = model.new_cache(max_cache_len=10)  # far too small: every kind must grow
    model(ids[:, :10], cache=cache)
    before = {kind: k.capacity for kind, k in cache._kinds.items()}
    for t in range(10, 70):
        out = model(ids[:, t : t + 1], cache=cache)
        assert ((out.logits[:, -1] - expected[:, t]).abs().max() / expected[:, t].abs().max()).item() <= TOL
    after = {kind: k.capacity for kind, k in cache._kinds.items()}
    assert all(after[kind] > before[kind] for kind in before)


@torch.no_grad()
def test_generate_uses_the_reduced_cache_sized_for_the_request(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    out = model.generate(
        ids, max_new_tokens=25, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    cache = _cache_of(out)
    assert isinstance(cache, LongGenCache)
    assert cache.get_seq_length() == 30 + 25 - 1  # the last token is produced, never fed back
    full = cache._kinds[next(k for k in cache._kinds if k.name == "full")]
    assert (
        full.capacity == 54
    )  # what generate() feeds (prompt + max_new_tokens - 1): no growth while decoding


@torch.no_grad()
def test_reorder_and_select_rows(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 25), generator=torch.Generator().manual_seed(3))
    nxt = torch.randint(0, model.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(4))
    cache = _cache_of(model(ids, use_cache=True))
    cache.reorder_cache(torch.tensor([2, 0, 2]))
    reordered = model(nxt, cache=cache).logits[:, -1]
    for row, src in enumerate([2, 0, 2]):
        alone = _cache_of(model(ids[src : src + 1], use_cache=True))
        want = model(nxt[row : row + 1], cache=alone).logits[:, -1]
        assert (reordered[row] - want[0]).abs().max().item() <= 1e-5


def test_errors_are_clear(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    holes = torch.tensor([[1, 1, 0, 1] * 3, [1] * 12])
    with pytest.raises(ValueError, match="contiguous span"):
        model(ids, attention_mask=holes)
    with pytest.raises(ValueError, match="without any real token"):
        model(ids, attention_mask=torch.tensor([[0] * 12, [1] * 12]))
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(TypeError, match="LongGenCache"):
        model(ids[:1], past_key_values=filled)
    cache = _cache_of(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="holds 2 rows but this forward has 1"):
        model(ids[:1, :1], cache=cache)
    with pytest.raises(NotImplementedError, match="LongGenLlamaForCausalLM"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 0)
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="unknown KV policy"):
        model.set_kv_policy("h2o")


@torch.no_grad()
def test_empty_dynamic_cache_is_replaced(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))
    out = model(ids, past_key_values=DynamicCache(), use_cache=True)
    assert isinstance(_cache_of(out), LongGenCache)
    assert isinstance(LongGenCache(layouts=model.model.kv_layouts()), Cache)


@torch.no_grad()
def test_chunked_prefill_generation_matches(model):
    """transformers' `prefill_chunk_size` feeds the prompt in chunks: the extend path, same tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(7))
    whole = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    chunked = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, prefill_chunk_size=8)
    assert chunked.tolist() == whole.tolist()
