"""FLOP accounting against counts worked out by hand (sink_window, block_strided, full attention)."""

import pytest

from megatron_longgen.config import ModelConfig, SparseAttentionConfig
from megatron_longgen.training import flops

MODEL = ModelConfig(
    num_layers=3,
    hidden_size=8,
    num_attention_heads=2,
    num_query_groups=1,
    ffn_hidden_size=16,
    vocab_size=10,
    layer_pattern="SFS",
)
SINK_WINDOW = SparseAttentionConfig(
    variant="sink_window", block_size=2, num_sink_blocks=1, num_window_blocks=2
)
BLOCK_STRIDED = SparseAttentionConfig(
    variant="block_strided", block_size=2, stride_blocks=2, num_local_blocks=1
)
SEQ = 8  # 4 blocks of 2 tokens


def test_attended_pairs_by_hand():
    # Full causal over 8 tokens: 1+2+...+8 = 36.
    assert (
        flops.attended_pairs_per_layer(model=MODEL, sparse=SINK_WINDOW, seq_length=SEQ, dense_equivalent=True)
        == [36] * 3
    )
    # sink_window (sink block 0, window = own + previous block). Keys per query, tokens 0..7:
    # block0: 1,2 | block1: 3,4 | block2: sink 2 + prev 2 + own 1,2 -> 5,6 | block3: sink 2 + prev 2 + 1,2 -> 5,6
    sw = 1 + 2 + 3 + 4 + 5 + 6 + 5 + 6
    assert flops.attended_pairs_per_layer(model=MODEL, sparse=SINK_WINDOW, seq_length=SEQ) == [sw, 36, sw]
    # block_strided (own block + blocks 0 and 2): block0: 1,2 | block1: 2+1, 2+2 | block2: 2+1, 2+2 |
    # block3: blocks 0, 2 (4 keys) + 1,2 -> 5,6
    bs = 1 + 2 + 3 + 4 + 3 + 4 + 5 + 6
    assert flops.attended_pairs_per_layer(model=MODEL, sparse=BLOCK_STRIDED, seq_length=SEQ) == [bs, 36, bs]


def test_forward_and_training_flops_by_hand():
    # Per token per layer: QKV 2*8*(8 + 2*4) = 256, out proj 2*8*8 = 128, SwiGLU 2*8*32 + 2*16*8 = 768 -> 1152.
    assert flops.linear_flops_per_token_per_layer(MODEL) == 1152
    assert flops.attention_flops_per_pair(MODEL) == 4 * 2 * 4 == 32
    logits = SEQ * 2 * 8 * 10
    for sparse, pairs_s in ((SINK_WINDOW, 32), (BLOCK_STRIDED, 28)):
        expected = 3 * SEQ * 1152 + 32 * (pairs_s + 36 + pairs_s) + logits
        assert flops.forward_flops_per_sequence(model=MODEL, sparse=sparse, seq_length=SEQ) == expected
        assert flops.training_flops_per_sequence(model=MODEL, sparse=sparse, seq_length=SEQ) == 3 * expected
    dense = 3 * SEQ * 1152 + 32 * 3 * 36 + logits
    assert (
        flops.forward_flops_per_sequence(
            model=MODEL, sparse=SINK_WINDOW, seq_length=SEQ, dense_equivalent=True
        )
        == dense
    )
    full = ModelConfig(**{**MODEL.__dict__, "layer_pattern": "FFF"})
    assert flops.forward_flops_per_sequence(model=full, sparse=SINK_WINDOW, seq_length=SEQ) == dense


def test_llama2_7b_128k_sparse_layers_are_cheaper():
    from megatron_longgen.recipes import llama2_7b_128k, llama2_7b_128k_full

    hybrid, full = llama2_7b_128k(), llama2_7b_128k_full()
    executed, dense = (
        flops.training_flops_per_step(hybrid),
        flops.training_flops_per_step(hybrid, dense_equivalent=True),
    )
    assert dense == flops.training_flops_per_step(full)
    # 2/3 of the layers keep ~2.1K of up to 128K keys: attention work drops by well over half.
    assert 0.3 < executed / dense < 0.6
    # Per-token dense model FLOPs ~ 6 * 6.7e9 params plus attention: sanity of magnitude.
    per_token = flops.training_flops_per_step(full) / (full.train.global_batch_size * full.train.seq_length)
    assert 6 * 6.5e9 < per_token < 6 * 6.5e9 + 3 * 4 * 4096 * 32 * 131072


def test_throughput_metrics_and_peak_table():
    from megatron_longgen.recipes import debug_tiny

    cfg = debug_tiny()
    step_flops = flops.training_flops_per_step(cfg)
    out = flops.throughput_metrics(cfg=cfg, step_time_s=2.0, num_gpus=4, peak_tflops=100.0)
    assert out["tflops_per_gpu"] == pytest.approx(step_flops / 2.0 / 4 / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops_per_gpu"] / 100.0)
    assert out["tflops_per_gpu_dense_equiv"] > out["tflops_per_gpu"]
    assert "mfu" not in flops.throughput_metrics(cfg=cfg, step_time_s=2.0, num_gpus=4, peak_tflops=None)
    assert flops.peak_tflops_for_device("NVIDIA H200") == 989.0
    assert flops.peak_tflops_for_device("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops_for_device("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_tflops_for_device("cpu") is None
    with pytest.raises(ValueError, match="step_time_s > 0"):
        flops.throughput_metrics(cfg=cfg, step_time_s=0.0, num_gpus=1, peak_tflops=None)
