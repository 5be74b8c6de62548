"""FLOP accounting for the hybrid model: *executed* (sparse layers count only their attended pairs) and
*dense-equivalent* (every layer counted as full causal attention, i.e. the `_full` baseline's work).

Upstream Megatron counts a sliding-window layer as full attention; we do not. Conventions, per sequence of
S tokens, forward pass, multiply-add = 2 FLOPs (h = hidden, d = head dim, N = query heads, G = KV heads,
f = SwiGLU width, V = vocabulary before padding):

    per token, per layer:  2·h·(N·d + 2·G·d)   QKV projection
                         + 2·N·d·h             output projection
                         + 2·h·2f + 2·f·h      SwiGLU (fused gate+up, then down)
    per attended (query, key) pair, per layer:  2·N·d (Q·Kᵀ) + 2·N·d (P·V) = 4·N·d
    per token:             2·h·V               output logits

Attended pairs come from `attention.masks.attended_pairs`: S(S+1)/2 for a full (causal) layer, the kept
pairs of the block pattern for an `S` layer. Training = 3 × forward (backward = 2 × forward); activation
recomputation is *not* counted (model FLOPs, the MFU convention).
"""

from __future__ import annotations

from functools import lru_cache

from megatron_longgen.config import LongGenConfig, ModelConfig, SparseAttentionConfig

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s per GPU, matched by substring of the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops_for_device(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s for a GPU name such as 'NVIDIA H200'; None when not in the table."""
    upper = device_name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in upper:
            return peak
    return None


@lru_cache(maxsize=64)
def _pairs(sparse: SparseAttentionConfig | None, seq_length: int) -> int:
    from megatron_longgen.attention.masks import attended_pairs, pattern_from_config

    return attended_pairs(None if sparse is None else pattern_from_config(sparse), seq_length)


def attended_pairs_per_layer(
    *, model: ModelConfig, sparse: SparseAttentionConfig, seq_length: int, dense_equivalent: bool = False
) -> list[int]:
    """(query, key) pairs each layer computes for one sequence, bottom layer first."""
    return [
        _pairs(None if (kind == "F" or dense_equivalent) else sparse, seq_length)
        for kind in model.layer_pattern
    ]


def linear_flops_per_token_per_layer(model: ModelConfig) -> int:
    """Forward FLOPs of one layer's projections and MLP for one token (attention scores excluded)."""
    h, d = model.hidden_size, model.head_dim
    q_dim, kv_dim = model.num_attention_heads * d, model.kv_heads * d
    return (
        2 * h * (q_dim + 2 * kv_dim)
        + 2 * q_dim * h
        + 2 * h * 2 * model.ffn_hidden_size
        + 2 * model.ffn_hidden_size * h
    )


def attention_flops_per_pair(model: ModelConfig) -> int:
    """Forward FLOPs of one attended (query, key) pair in one layer: Q·Kᵀ and P·V over all query heads."""
    return 4 * model.num_attention_heads * model.head_dim


def layer_forward_flops(
    *, model: ModelConfig, sparse: SparseAttentionConfig, seq_length: int, dense_equivalent: bool = False
) -> list[int]:
    """Forward FLOPs of each layer for one sequence (used for pipeline balancing and reports)."""
    linear = seq_length * linear_flops_per_token_per_layer(model)
    per_pair = attention_flops_per_pair(model)
    pairs = attended_pairs_per_layer(
        model=model, sparse=sparse, seq_length=seq_length, dense_equivalent=dense_equivalent
    )
    return [linear + per_pair * p for p in pairs]


def forward_flops_per_sequence(
    *, model: ModelConfig, sparse: SparseAttentionConfig, seq_length: int, dense_equivalent: bool = False
) -> int:
    """Forward FLOPs of the whole model (layers + logits) for one sequence of `seq_length` tokens."""
    layers = layer_forward_flops(
        model=model, sparse=sparse, seq_length=seq_length, dense_equivalent=dense_equivalent
    )
    return sum(layers) + seq_length * 2 * model.hidden_size * model.vocab_size


def training_flops_per_sequence(
    *, model: ModelConfig, sparse: SparseAttentionConfig, seq_length: int, dense_equivalent: bool = False
) -> int:
    """Forward + backward FLOPs (3 × forward) for one sequence; recomputation not counted."""
    return 3 * forward_flops_per_sequence(
        model=model, sparse=sparse, seq_length=seq_length, dense_equivalent=dense_equivalent
    )


def training_flops_per_step(cfg: LongGenConfig, *, dense_equivalent: bool = False) -> int:
    """Training FLOPs of one optimizer step (global batch of `global_batch_size` sequences)."""
    t = cfg.train
    return t.global_batch_size * training_flops_per_sequence(
        model=cfg.model, sparse=cfg.sparse, seq_length=t.seq_length, dense_equivalent=dense_equivalent
    )


def throughput_metrics(
    *, cfg: LongGenConfig, step_time_s: float, num_gpus: int, peak_tflops: float | None
) -> dict[str, float]:
    """TFLOP/s per GPU, executed and dense-equivalent, and MFU (executed / peak) when the peak is known."""
    if step_time_s <= 0 or num_gpus < 1:
        raise ValueError(f"need step_time_s > 0 and num_gpus >= 1, got {step_time_s} and {num_gpus}")
    executed = training_flops_per_step(cfg) / step_time_s / num_gpus / 1e12
    dense = training_flops_per_step(cfg, dense_equivalent=True) / step_time_s / num_gpus / 1e12
    out = {"tflops_per_gpu": executed, "tflops_per_gpu_dense_equiv": dense}
    if peak_tflops:
        out["mfu"] = executed / peak_tflops
        out["mfu_dense_equiv"] = dense / peak_tflops
    return out
