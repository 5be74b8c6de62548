"""Reduced-cache inference on CUDA: bf16 prefill (Triton / cuDNN sparse kernels, SDPA) + decode vs the fp32
dense-mask oracle, greedy generation, and a 128K prefill's memory.

Criterion (STYLE rule 5): max |bf16 cache path - fp32 oracle| <= 3 x max |naive bf16 dense oracle - fp32
oracle| over the prefill logits and every decode step's logits. Sparse pattern: 64-token blocks (what the
kernels are tuned for), a 4-block window and 1 sink (sink_window) or stride 4 with 2 local blocks
(block_strided), so 1,400 tokens cross several evictions and stride blocks.
"""

import pytest
import torch

from megatron_longgen.attention.kernels import available_kernels
from tests.inference.reference import oracle_greedy, oracle_logits, oracle_model, tiny_config, tiny_model

pytestmark = pytest.mark.gpu

GPU_SPARSE = {"block_size": 64, "num_sink_blocks": 1, "num_window_blocks": 4, "stride_blocks": 4,
              "num_local_blocks": 2}  # fmt: skip
SHAPES = {"gqa_h64": (8, 2), "mha_h128": (4, 4)}  # (query heads, kv heads); hidden 512


def _backends():
    if not torch.cuda.is_available():
        return []
    reg = available_kernels()
    dev = torch.device("cuda")
    names = ("triton", "cudnn_bsa", "cudnn_bsa_fwd")  # what `auto` picks for inference (flex: training only)
    return [n for n in names if reg[n].is_available(device=dev, dtype=torch.bfloat16)]


def _config(variant: str, heads: int, kv_heads: int):
    return tiny_config(layer_pattern="SFFS", variant=variant, kv_heads=kv_heads, vocab=512, hidden=512, heads=heads,
                       intermediate=1024, max_positions=4096, **GPU_SPARSE)  # fmt: skip


def _cache_of(output):
    return output.cache if hasattr(type(output), "cache") else output.past_key_values


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", _backends() or ["none"])
@pytest.mark.parametrize("variant", ["sink_window", "block_strided"])
@torch.no_grad()
def test_bf16_prefill_and_decode_match_dense_oracle(variant, backend, shape):
    if backend == "none":
        pytest.skip("no fast sparse kernel runs on this GPU")
    heads, kv_heads = SHAPES[shape]
    model32 = tiny_model(_config(variant, heads, kv_heads), seed=0).cuda()
    gold_ref = oracle_model(model32)
    model16 = tiny_model(_config(variant, heads, kv_heads), seed=0, dtype=torch.bfloat16).cuda()
    pattern = model16.model.layers[0].self_attn.longgen_pattern
    reason = available_kernels()[backend].unavailable_reason(
        device=torch.device("cuda"), dtype=torch.bfloat16, pattern=pattern, head_dim=512 // heads
    )
    if reason is not None:
        pytest.skip(f"{backend} does not run {pattern}: {reason}")
    model16.sparse_backend = backend
    naive_ref = oracle_model(model16)
    ids = torch.randint(0, 512, (2, 1400), generator=torch.Generator().manual_seed(1)).cuda()
    prefill = 1000  # not a multiple of 64: a partial block at the prefill boundary
    gold = oracle_logits(gold_ref, ids)
    naive = (oracle_logits(naive_ref, ids).float() - gold).abs().max().item()
    out = model16(ids[:, :prefill], use_cache=True)
    errors = [(out.logits.float() - gold[:, :prefill]).abs().max().item()]
    cache = _cache_of(out)
    for t in range(prefill, ids.shape[1]):
        step = model16(ids[:, t : t + 1], cache=cache)
        errors.append((step.logits[:, -1].float() - gold[:, t]).abs().max().item())
    worst = max(errors)
    assert worst <= 3 * naive, (
        f"{backend}: worst {worst:.3e} (prefill {errors[0]:.3e}) vs naive bf16 {naive:.3e}"
    )


@pytest.mark.parametrize("variant", ["sink_window", "block_strided"])
@torch.no_grad()
def test_fp32_greedy_generation_on_cuda_matches_oracle(variant):
    model = tiny_model(_config(variant, 8, 2), seed=2).cuda()
    model.sparse_backend = "torch"  # fp32: the fast kernels are bf16/fp16 (auto would compile Flex here)
    ref = oracle_model(model)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (700, 450)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    out = model.generate(
        ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=300, do_sample=False, pad_token_id=0
    )
    for row, p in enumerate(prompts):
        want = oracle_greedy(ref, p[None].cuda(), max_new_tokens=300)[0, len(p) :]
        assert out[row, width:].tolist() == want.tolist()


@torch.no_grad()
def test_128k_prefill_memory_is_linear():
    """Two 7B-width layers (S, F) at 128K in bf16: peak memory stays at weights + KV + O(S x hidden)
    activations; one [S, S] bf16 score matrix alone would be 32 GiB."""
    from megatron_longgen.checkpoint.hf_model import LongGenLlamaConfig, LongGenLlamaForCausalLM

    cfg = LongGenLlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                             longgen={"layer_pattern": "SF", "variant": "sink_window", "block_size": 64,
                                      "num_sink_blocks": 1, "num_window_blocks": 32, "stride_blocks": 64,
                                      "num_local_blocks": 1, "backend": "auto"})  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LongGenLlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    seq = 131072
    ids = torch.randint(0, 32000, (1, seq), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache(max_cache_len=seq + 16)
    out = model(ids, cache=cache, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(4):
        token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kv = cache.nbytes()
    assert cache.nbytes_by_kind()["sink_window"] == 2 * 33 * 64 * 4096 * 2  # K and V, 2,112 slots, bf16
    activations = peak - kv
    assert activations < 16 * 2**30, (
        f"prefill activations {activations / 2**30:.1f} GiB (KV {kv / 2**30:.1f} GiB)"
    )


@pytest.mark.parametrize("variant", ["sink_window", "block_strided"])
@torch.no_grad()
def test_cuda_graph_decode_matches_dense_oracle(variant):
    """Decode steps replayed from a CUDA graph (split-KV kernel for the full layers), including a buffer
    growth mid-way (forces a new capture), against the fp32 oracle with the bf16 criterion."""
    from megatron_longgen.inference.cuda_graphs import CudaGraphDecoder

    model32 = tiny_model(_config(variant, 8, 2), seed=5).cuda()
    model16 = tiny_model(_config(variant, 8, 2), seed=5, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 512, (2, 1200), generator=torch.Generator().manual_seed(6)).cuda()
    gold = oracle_logits(oracle_model(model32), ids)
    naive = (oracle_logits(oracle_model(model16), ids).float() - gold).abs().max().item()
    cache = model16.new_cache(max_cache_len=900)  # the full layers must grow past 900 tokens
    model16(ids[:, :800], cache=cache)
    decoder = CudaGraphDecoder(model16, cache)
    versions, worst = set(), 0.0
    for t in range(800, 1200):
        logits = decoder(ids[:, t : t + 1])
        versions.add(decoder.version)
        worst = max(worst, (logits.float() - gold[:, t]).abs().max().item())
    assert len(versions) >= 2, "the buffers should have grown and the step been captured again"
    assert cache.lengths == [1200, 1200] and cache.get_seq_length() == 1200
    assert worst <= 3 * naive, f"graph decode worst {worst:.3e} vs naive bf16 {naive:.3e}"


@torch.no_grad()
def test_generate_with_cuda_graphs_equals_eager():
    model = tiny_model(_config("sink_window", 8, 2), seed=7).cuda()
    model.sparse_backend = "torch"
    ids = torch.randint(0, 512, (1, 600), generator=torch.Generator().manual_seed(8)).cuda()
    eager = model.generate(ids, max_new_tokens=200, do_sample=False, pad_token_id=0)
    model.use_cuda_graphs = True
    try:
        graphed = model.generate(ids, max_new_tokens=200, do_sample=False, pad_token_id=0)
    finally:
        model.use_cuda_graphs = False
    assert graphed.tolist() == eager.tolist()
