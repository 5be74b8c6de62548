"""The step-time model on small configs, against numbers worked out by hand from its stated rules."""

import dataclasses

import pytest

from megatron_longgen.config import (
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    TrainingConfig,
)
from megatron_longgen.launch.gpus import GpuSpec
from megatron_longgen.launch.layout import Layout
from megatron_longgen.launch.timing import collective_s, cp_exposed_seconds, estimate_step_time

# Round rates so that the hand computation is readable: 1 TFLOP/s GEMMs, attention 2 (fwd) / 1 (bwd)
# TFLOP/s dense and 4 / 2 sparse, 1 GB/s HBM, 10 GB/s links without latency.
GPU = GpuSpec(
    name="toy",
    description="toy",
    memory_gib=80.0,
    peak_bf16_tflops=10.0,
    matmul_tflops=1.0,
    hbm_gbps=1.0,
    dense_attn_tflops=(2.0, 1.0),
    sparse_attn_tflops={"sink_window/triton": (4.0, 2.0)},
    nvlink_gbps=10.0,
    ib_gbps=10.0,
    intra_latency_s=0.0,
    inter_latency_s=0.0,
)


def _cfg(pattern="FF", *, seq=256, gbs=1, recompute="none") -> LongGenConfig:
    return LongGenConfig(
        name="toy",
        model=ModelConfig(
            num_layers=len(pattern),
            hidden_size=64,
            num_attention_heads=4,
            ffn_hidden_size=128,
            vocab_size=128,
            layer_pattern=pattern,
        ),
        sparse=SparseAttentionConfig(block_size=16, num_window_blocks=2),
        parallel=ParallelConfig(),
        train=TrainingConfig(seq_length=seq, global_batch_size=gbs, max_steps=1, recompute=recompute),
    )


def test_single_gpu_step_by_hand():
    s = estimate_step_time(
        _cfg(), Layout(tp=1, pp=1, cp=1, dp=1, recompute="none", sequence_parallel=False), GPU
    )
    # Per token per layer: QKV 2*64*192 + proj 2*64*64 + fc1 2*64*256 + fc2 2*128*64 = 81,920 FLOPs.
    lin = 256 * 81920 / 1e12
    assert s.gemm == pytest.approx(
        2 * 3 * lin + 3 * 2 * 256 * 64 * 128 / 1e12
    )  # 2 layers x (1 fwd + 2 bwd) + logits
    # 256*257/2 causal pairs x 4*4*16 FLOPs, forward at 2 TFLOP/s, backward (2.5x) at 1.
    attn = 256 * 257 // 2 * 256
    assert s.attention == pytest.approx(2 * (attn / 2e12 + 2.5 * attn / 1e12))
    # Element-wise bytes per token and layer: 68h + 21(n+g)d + 14f, forward once and backward twice.
    elem = 256 * (68 * 64 + 21 * 8 * 16 + 14 * 128) / 1e9
    head = 256 * (52 * 128 + 3 * 28 * 64) / 1e9
    assert s.elementwise == pytest.approx(2 * 3 * elem + head)
    assert s.recompute == s.tp_comm == s.cp_comm == s.pp_comm == s.bubble == s.dp_comm == 0.0
    params = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 128 * 64 + 128) + 128 * 64 + 64 + 128 * 64
    assert s.optimizer == pytest.approx((98 + 9 + 10) * params / 1e9)
    assert s.total == pytest.approx(s.gemm + s.attention + s.elementwise + s.optimizer)


def test_recompute_adds_forward_work():
    layout = Layout(tp=1, pp=1, cp=1, dp=1, recompute="none", sequence_parallel=False)
    base = estimate_step_time(_cfg(), layout, GPU)
    full = estimate_step_time(_cfg(recompute="full"), dataclasses.replace(layout, recompute="full"), GPU)
    selective = estimate_step_time(
        _cfg(recompute="selective"), dataclasses.replace(layout, recompute="selective"), GPU
    )
    attn_fwd = 2 * (256 * 257 // 2 * 256) / 2e12
    assert selective.recompute == pytest.approx(attn_fwd)
    lin_fwd = 2 * 256 * 81920 / 1e12
    elem_fwd = 2 * 256 * (68 * 64 + 21 * 8 * 16 + 14 * 128) / 1e9
    assert full.recompute == pytest.approx(lin_fwd + attn_fwd + elem_fwd)
    assert full.total - base.total == pytest.approx(full.recompute)


def test_sparse_layers_are_cheaper_at_their_own_rate():
    dense = estimate_step_time(_cfg("FF"), Layout(tp=1, pp=1, cp=1, dp=1, recompute="none"), GPU)
    hybrid = estimate_step_time(_cfg("SF"), Layout(tp=1, pp=1, cp=1, dp=1, recompute="none"), GPU)
    # sink + window of 2 blocks of 16: block-causal pairs per query block, from the mask code itself.
    from megatron_longgen.attention.masks import attended_pairs, pattern_from_config

    sparse_pairs = attended_pairs(pattern_from_config(_cfg().sparse), 256)
    dense_pairs = 256 * 257 // 2
    expected = (
        dense_pairs * 256 / 2e12
        + 2.5 * dense_pairs * 256 / 1e12
        + sparse_pairs * 256 / 4e12
        + 2.5 * sparse_pairs * 256 / 2e12
    )
    assert hybrid.attention == pytest.approx(expected)
    assert hybrid.attention < dense.attention


def test_collectives_and_pipeline_bubble():
    assert collective_s(size=1, nbytes=1e9, bandwidth_gbps=1, latency_s=1) == 0.0
    assert collective_s(size=4, nbytes=4e9, bandwidth_gbps=1, latency_s=0.5) == pytest.approx(3 * 0.5 + 3.0)
    assert collective_s(size=4, nbytes=4e9, bandwidth_gbps=1, latency_s=0.0, allreduce=True) == pytest.approx(
        6.0
    )
    cfg = _cfg("FFFF", gbs=8)
    s = estimate_step_time(cfg, Layout(tp=1, pp=2, cp=1, dp=1, recompute="none"), GPU)
    assert s.num_microbatches == 8 and s.bubble == pytest.approx(s.microbatch_s)  # (pp - 1) slots
    # Two activation messages per micro-batch: 256 tokens x 64 x 2 bytes over 10 GB/s.
    assert s.pp_comm == pytest.approx(8 * 2 * 256 * 64 * 2 / 10e9)


def test_ring_hops_hide_behind_the_step_kernels_until_they_do_not():
    kw = {
        "kind": "F",
        "cp": 4,
        "kv_token_elems": 256,
        "act_bytes": 2,
        "local_tokens": 1000,
        "halo_tokens": 0.0,
        "bandwidth_gbps": 1.0,
        "latency_s": 0.0,
    }
    hop_f, hop_b = 256 * 2 * 1000 / 1e9, 256 * 6 * 1000 / 1e9
    last_hop = 256 * 4 * 1000 / 1e9  # dK/dV back to their owner, after the last step
    assert cp_exposed_seconds(attn_fwd_s=1.0, attn_bwd_s=1.0, **kw) == pytest.approx((0.0, last_hop))
    fwd, bwd = cp_exposed_seconds(attn_fwd_s=0.0, attn_bwd_s=0.0, **kw)
    assert fwd == pytest.approx(3 * hop_f) and bwd == pytest.approx(3 * hop_b + last_hop)
    sparse = cp_exposed_seconds(attn_fwd_s=1.0, attn_bwd_s=1.0, **dict(kw, kind="S", halo_tokens=100.0))
    assert sparse == pytest.approx((256 * 2 * 100 / 1e9, 256 * 4 * 100 / 1e9))
    assert cp_exposed_seconds(attn_fwd_s=0.0, attn_bwd_s=0.0, **dict(kw, cp=1)) == (0.0, 0.0)


def test_tensor_parallel_splits_compute_and_adds_collectives():
    cfg = _cfg(seq=256)
    one = estimate_step_time(cfg, Layout(tp=1, pp=1, cp=1, dp=1, recompute="none"), GPU)
    two = estimate_step_time(cfg, Layout(tp=2, pp=1, cp=1, dp=1, recompute="none"), GPU)
    assert two.attention == pytest.approx(one.attention / 2)
    # Sequence parallel: 4 forward + 6 backward gathers / scatters of 256 x 64 x 2 bytes per layer, half moved.
    assert two.tp_comm == pytest.approx(2 * 10 * 0.5 * 256 * 64 * 2 / 10e9)
