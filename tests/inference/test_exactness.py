"""Prefill + step-by-step decode with the reduced cache == the dense-mask full forward (fp32), both sparse
variants, GQA, several window evictions and stride boundaries, batches with unequal lengths."""

import pytest
import torch

from tests.inference.reference import (
    left_pad,
    oracle_greedy,
    oracle_logits,
    oracle_model,
    tiny_config,
    tiny_model,
)

TOL = 2e-5  # fp32: the cache path and the dense oracle differ only in summation order
VARIANTS = ["sink_window", "block_strided"]


def _cache_of(output):
    return output.cache if hasattr(type(output), "cache") else output.past_key_values


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request):
    """(LongGen model with pattern SFFS, its dense-mask oracle)."""
    model = tiny_model(tiny_config(variant=request.param), seed=1)
    return model, oracle_model(model)


@pytest.mark.parametrize("prefill", [1, 4, 5, 13, 24])
@torch.no_grad()
def test_prefill_then_decode_matches_dense_forward(pair, prefill):
    model, ref = pair
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(prefill))
    expected = oracle_logits(ref, ids)
    out = model(ids[:, :prefill], use_cache=True)
    assert _max_rel(out.logits, expected[:, :prefill]) <= TOL
    cache = _cache_of(out)
    # 64 tokens cross 13 window evictions (12-token window) and 5 stride boundaries (every 12 tokens).
    for t in range(prefill, ids.shape[1]):
        step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = _cache_of(step)
        err = _max_rel(step.logits[:, -1], expected[:, t])
        assert err <= TOL, f"position {t}: max relative error {err:.2e}"
    assert cache.get_seq_length() == ids.shape[1]


@torch.no_grad()
def test_full_forward_without_cache_matches(pair):
    model, ref = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 57), generator=torch.Generator().manual_seed(3))
    assert _max_rel(model(ids, use_cache=False).logits, oracle_logits(ref, ids)) <= TOL
    # The masks drop keys: the all-full forward of the same weights differs clearly.
    model.set_kv_policy("full")
    try:
        assert _max_rel(model(ids, use_cache=False).logits, oracle_logits(ref, ids)) > 1e-2
    finally:
        model.set_kv_policy("model")


@pytest.mark.parametrize("kv_heads", [1, 4])
@torch.no_grad()
def test_gqa_and_mha(kv_heads):
    model = tiny_model(tiny_config(kv_heads=kv_heads, layer_pattern="SFS"), seed=2)
    ref = oracle_model(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    expected = oracle_logits(ref, ids)
    cache = _cache_of(model(ids[:, :7], use_cache=True))
    for t in range(7, 40):
        step = model(ids[:, t : t + 1], cache=cache)
        assert _max_rel(step.logits[:, -1], expected[:, t]) <= TOL


@torch.no_grad()
def test_batch_left_padded_unequal_lengths(pair):
    """Rows of 29 and 14 prompt tokens, decoded together for 30 steps; each row against its own unpadded oracle."""
    model, ref = pair
    gen = torch.Generator().manual_seed(5)
    full_rows = [torch.randint(0, model.config.vocab_size, (59,), generator=gen) for _ in range(2)]
    prompt_lens = [29, 14]
    ids, mask = left_pad([r[:n] for r, n in zip(full_rows, prompt_lens)])
    expected = [oracle_logits(ref, r[None])[0] for r in full_rows]
    out = model(ids, attention_mask=mask, use_cache=True)
    for row, n in enumerate(prompt_lens):
        assert _max_rel(out.logits[row, -n:], expected[row][:n]) <= TOL
    cache = _cache_of(out)
    for step in range(30):
        nxt = torch.stack([full_rows[r][prompt_lens[r] + step] for r in range(2)])[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = model(nxt, attention_mask=mask, cache=cache)
        cache = _cache_of(out)
        for row, n in enumerate(prompt_lens):
            err = _max_rel(out.logits[row, -1], expected[row][n + step])
            assert err <= TOL, f"row {row}, position {n + step}: {err:.2e}"
    assert cache.lengths == [29 + 30, 14 + 30]


@torch.no_grad()
def test_right_padded_scoring(pair):
    model, ref = pair
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (33, 18)]
    ids = torch.zeros(2, 33, dtype=torch.long)
    mask = torch.zeros(2, 33, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    for i, r in enumerate(rows):
        assert _max_rel(logits[i, : len(r)], oracle_logits(ref, r[None])[0]) <= TOL


@pytest.mark.parametrize("chunk", [3, 7, 16])
@torch.no_grad()
def test_extend_in_chunks(pair, chunk):
    """Chunked prefill / multi-token steps over a filled cache (chunks cross evictions and strides)."""
    model, ref = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(chunk))
    expected = oracle_logits(ref, ids)
    cache = _cache_of(model(ids[:, :9], use_cache=True))
    for start in range(9, 60, chunk):
        out = model(ids[:, start : start + chunk], cache=cache)
        cache = _cache_of(out)
        assert _max_rel(out.logits, expected[:, start : start + chunk]) <= TOL, f"chunk at {start}"


@torch.no_grad()
def test_greedy_generate_matches_oracle_token_for_token(pair):
    model, ref = pair
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (21, 10)]
    ids, mask = left_pad(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        want = oracle_greedy(ref, prompt[None], max_new_tokens=40)[0, len(prompt) :]
        assert out[row, ids.shape[1] :].tolist() == want.tolist()


@torch.no_grad()
def test_generate_stops_at_stop_token(pair):
    model, ref = pair
    prompt = torch.randint(0, model.config.vocab_size, (1, 15), generator=torch.Generator().manual_seed(9))
    free = oracle_greedy(ref, prompt, max_new_tokens=30)[0, 15:].tolist()
    stop = free[12]  # a token greedy decoding produces: generation must end right there
    first = free.index(stop)
    out = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=stop, pad_token_id=stop)
    assert out[0, 15:].tolist() == free[: first + 1]


@torch.no_grad()
def test_beam_search_cache_matches_no_cache(pair):
    """Beam search reorders the cache rows every step; without a cache every step is a full forward."""
    model, _ = pair
    prompt = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(10))
    kwargs = {"max_new_tokens": 20, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.tolist() == without.tolist()


@torch.no_grad()
def test_kv_policy_sink_window_on_full_model_is_attnsink():
    """`--kv-policy sink_window` on an all-F model equals a model whose every layer is sink_window."""
    full = tiny_model(tiny_config(layer_pattern="FFF"), seed=11)
    full.set_kv_policy("sink_window")
    assert full.layer_kinds() == "SSS"
    ref = oracle_model(full)  # the oracle takes the per-layer patterns of the current policy
    ids = torch.randint(0, full.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(12))
    expected = oracle_logits(ref, ids)
    cache = _cache_of(full(ids[:, :20], use_cache=True))
    for t in range(20, 45):
        out = full(ids[:, t : t + 1], cache=cache)
        assert _max_rel(out.logits[:, -1], expected[:, t]) <= TOL
    assert set(cache.nbytes_by_kind()) == {"sink_window"}


@torch.no_grad()
def test_bf16_decode_within_bf16_tolerance():
    """bf16 prefill + decode vs the fp32 oracle: no worse than 3x a naive bf16 dense forward's error."""
    model32 = tiny_model(tiny_config(), seed=13)
    ref32 = oracle_model(model32)
    model16 = tiny_model(tiny_config(), seed=13, dtype=torch.bfloat16)
    ref16 = oracle_model(model16)
    ids = torch.randint(0, model32.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(14))
    gold = oracle_logits(ref32, ids)
    naive = (oracle_logits(ref16, ids).float() - gold).abs().max().item()
    cache = _cache_of(model16(ids[:, :10], use_cache=True))
    worst = 0.0
    for t in range(10, 48):
        out = model16(ids[:, t : t + 1], cache=cache)
        worst = max(worst, (out.logits[:, -1].float() - gold[:, t]).abs().max().item())
    assert worst <= 3 * naive + 1e-3, f"bf16 cache error {worst:.3e} vs naive bf16 {naive:.3e}"
