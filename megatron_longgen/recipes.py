"""Named runs: each recipe is a function returning a `LongGenConfig`; a variant calls its base and changes
fields (`dataclasses.replace`). `longgen-train --recipe NAME` looks them up in `RECIPES`.

| recipe              | what                                                                          |
|---------------------|-------------------------------------------------------------------------------|
| debug_tiny          | 6-layer `SSFFSS` hybrid, 1,024 tokens, shipped corpus; CPU in ~1-2 min        |
| debug_tiny_full     | the same, all layers full (the baseline)                                      |
| llama2_7b_128k      | LongGen 7B: 4K -> 128K, middle third full, sink+window, TP=2, full recompute  |
| llama2_7b_128k_full | the full-attention baseline of the same run                                   |
| llama2_70b_128k     | LongGen 70B (GQA 64/8): TP=8, CP=8, full recompute                            |
| llama2_70b_128k_full| its full-attention baseline                                                   |
| smollm2_32k_longgen | SmolLM2-135M 8K -> 32K as LongGen: middle 10 of 30 layers full (= smollm2_32k) |
| smollm2_32k_sparse_only | the same run with all 30 layers sink_window (the no-full-layers ablation)  |
| smollm2_32k_full    | the same run with all 30 layers full (the baseline)                           |

| llama2_7b_128k_pi   | the 7B run with linear position interpolation (factor 32, base 10,000)        |
| llama2_7b_128k_yarn | the 7B run with YaRN (factor 32 over the original 4,096, base 10,000)         |

RoPE for 4K -> 128K, per recipe (`ModelConfig.rope_scaling`, recorded in every checkpoint's
longgen_config.json and so in exports):
- default (`llama2_*_128k`): the base is raised from 10,000 to 500,000 ("ABF"), following the
  long-context data recipe LongGen builds on (Fu et al. 2024); no other scaling;
- `_pi`: linear position interpolation, positions divided by 32, base 10,000;
- `_yarn`: YaRN with factor 32 over the original 4,096 positions, base 10,000.
- `smollm2_32k_*` (8K -> 32K): the base is raised from SmolLM2's 100,000 to 1,000,000 (see `smollm2_32k`).
Positions stay absolute in every layer. Any recipe can switch with overrides, e.g.
`--override model.rotary_base=10000 model.rope_scaling=yarn model.rope_scaling_factor=32`.

Production inputs: the `llama2_*` recipes leave the data blend, the tokenizer and the initial checkpoint to
the command line (`--data-blend`, `--tokenizer`, `--init-checkpoint`) or the environment
(`LONGGEN_DATA_BLEND`, `LONGGEN_TOKENIZER`, `LONGGEN_INIT_CHECKPOINT`) and refuse to start without them
(`launch/inputs.py`); `debug_tiny` keeps the shipped corpus and tokenizer.

Parallel layouts: chosen with `tools/plan_parallelism.py` for 8 nodes x 8 H100-80GB (64 GPUs): of the
layouts that leave 10% of the memory free, those within 5% of the fastest predicted throughput, the one
with the fewest of pipeline and context parallelism. Predicted (LongGen / full-attention baseline,
tokens/s/GPU, executed MFU): 7B TP=2 DP=32 full recompute 4,567 / 2,533 (0.356 / 0.366); 70B TP=8 CP=8 full
recompute 549 / 370 (0.331 / 0.347). Another cluster: run the planner and override `parallel.*`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from megatron_longgen.config import (
    DataConfig,
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    TrainingConfig,
)
from megatron_longgen.launch.inputs import FROM_COMMAND_LINE
from megatron_longgen.models.layer_pattern import default_layer_pattern, full_pattern


def with_full_attention(cfg: LongGenConfig) -> LongGenConfig:
    """The baseline of a run: same everything, every layer full."""
    model = dataclasses.replace(cfg.model, layer_pattern=full_pattern(cfg.model.num_layers))
    return dataclasses.replace(cfg, name=cfg.name + "_full", model=model)


def with_sparse_variant(cfg: LongGenConfig, variant: str) -> LongGenConfig:
    return dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, variant=variant))


def with_rope_scaling(
    cfg: LongGenConfig, scaling: str, *, factor: float, rotary_base: float = 10000.0
) -> LongGenConfig:
    """The same run with another RoPE length extension (`linear` or `yarn`) on the original base."""
    model = dataclasses.replace(
        cfg.model, rope_scaling=scaling, rope_scaling_factor=factor, rotary_base=rotary_base
    )
    suffix = {"linear": "_pi", "yarn": "_yarn"}.get(scaling, f"_{scaling}")
    return dataclasses.replace(cfg, name=cfg.name + suffix, model=model)


def debug_tiny() -> LongGenConfig:
    """A small hybrid on the shipped corpus. The sparse pattern is scaled down (16-token blocks; sink_window:
    1 sink + 4 window blocks, ~80 of up to 1,024 keys per query; block_strided: every 4th block + 2 local
    blocks, 16 strided blocks at 1,024 tokens) so that the S layers really are sparse, and the strided
    variant crosses several stride blocks even at the tests' 128 tokens (a wrong stride changes the
    golden losses, tests/training/test_golden_losses.py)."""
    return LongGenConfig(
        name="debug_tiny",
        model=ModelConfig(
            num_layers=6,
            hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=352,
            vocab_size=1024,
            layer_pattern="SSFFSS",
            rotary_base=10000.0,
        ),
        sparse=SparseAttentionConfig(
            variant="sink_window",
            block_size=16,
            num_sink_blocks=1,
            num_window_blocks=4,
            stride_blocks=4,
            num_local_blocks=2,
        ),
        parallel=ParallelConfig(use_distributed_optimizer=False),
        train=TrainingConfig(
            seq_length=1024,
            micro_batch_size=2,
            global_batch_size=4,
            max_steps=120,
            lr=3e-3,
            min_lr=3e-4,
            lr_warmup_steps=10,
            lr_decay_style="cosine",
            weight_decay=0.01,
            dtype="fp32",
            seed=1234,
            log_interval=5,
        ),
        data=DataConfig(corpus="builtin:tiny_stories", tokenizer="builtin:tiny_sp", valid_fraction=0.05),
    )


def debug_tiny_full() -> LongGenConfig:
    return with_full_attention(debug_tiny())


def llama2_7b_128k() -> LongGenConfig:
    """LongGen on Llama-2 7B: 5B tokens of 128K-packed long documents, TP=2 + sequence parallel, full
    recompute, bf16 (the planner's choice for 64 H100-80GB; on 64 GPUs DP=32, one sequence per rank).
    RoPE: raised base 500,000, no scaling. Data blend, tokenizer and initial checkpoint (a converted
    Llama-2, tools/convert_hf_to_mcore.py) come from the command line or the environment."""
    num_layers = 32
    return LongGenConfig(
        name="llama2_7b_128k",
        model=ModelConfig(
            num_layers=num_layers,
            hidden_size=4096,
            num_attention_heads=32,
            ffn_hidden_size=11008,
            vocab_size=32000,
            layer_pattern=default_layer_pattern(num_layers),
            rotary_base=500000.0,
        ),
        sparse=SparseAttentionConfig(variant="sink_window"),
        parallel=ParallelConfig(tensor_parallel=2, sequence_parallel=True, use_distributed_optimizer=True),
        train=TrainingConfig(
            seq_length=131072,
            micro_batch_size=1,
            global_batch_size=32,
            max_steps=1200,
            lr=2e-5,
            min_lr=2e-5,
            lr_warmup_steps=0,
            lr_decay_style="constant",
            weight_decay=0.0,
            dtype="bf16",
            recompute="full",
            log_interval=1,
            save_interval=100,
            init_checkpoint=FROM_COMMAND_LINE,
        ),
        data=DataConfig(corpus=FROM_COMMAND_LINE, tokenizer=FROM_COMMAND_LINE),
    )


def llama2_7b_128k_full() -> LongGenConfig:
    return with_full_attention(llama2_7b_128k())


def llama2_7b_128k_pi() -> LongGenConfig:
    """Linear position interpolation instead of the raised base: 131072 / 4096 = 32."""
    return with_rope_scaling(llama2_7b_128k(), "linear", factor=32.0)


def llama2_7b_128k_yarn() -> LongGenConfig:
    """YaRN instead of the raised base: factor 32 over Llama-2's 4,096 pretraining positions."""
    return with_rope_scaling(llama2_7b_128k(), "yarn", factor=32.0)


def llama2_70b_128k() -> LongGenConfig:
    """LongGen on Llama-2 70B (GQA: 64 query / 8 KV heads): TP=8 + sequence parallel inside a node, CP=8
    across nodes, full recompute (the planner's choice for 64 H100-80GB: 64 GiB of 73 usable, DP=1 with 32
    micro-batches). RoPE: raised base 500,000 (inherited from the 7B recipe). With PP, stages are balanced
    by attention cost (`train.pipeline_layout="balanced"`: the full middle layers are dearer)."""
    base = llama2_7b_128k()
    num_layers = 80
    model = dataclasses.replace(
        base.model,
        num_layers=num_layers,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        layer_pattern=default_layer_pattern(num_layers),
    )
    parallel = ParallelConfig(
        tensor_parallel=8,
        pipeline_parallel=1,
        context_parallel=8,
        sequence_parallel=True,
        use_distributed_optimizer=True,
    )
    return dataclasses.replace(base, name="llama2_70b_128k", model=model, parallel=parallel)


def llama2_70b_128k_full() -> LongGenConfig:
    return with_full_attention(llama2_70b_128k())


SMOLLM2_WORKDIR = "runs/smollm2_32k"
"""Where `examples/smollm2_32k/` writes (relative to the repository root); the SmolLM2 recipes' default data,
tokenizer and initial checkpoint paths point into it, so `longgen-train --recipe smollm2_32k_longgen` works
from the repository root after `prepare_model.py` and `build_data.py`."""


def smollm2_32k() -> LongGenConfig:
    """SmolLM2-135M-Instruct (a Llama: 30 layers, d 576, GQA 9/3, head dim 64, SwiGLU 1536, tied embeddings,
    49,152-token byte-level BPE, RoPE base 100,000, 8K context) extended to 32K as LongGen: the middle 10
    layers full, the other 20 `sink_window` with the paper's 64-token blocks, 1 sink block, 32 window blocks
    (2,112 keys per query). `examples/smollm2_32k/` runs it with its two baselines on one GPU.

    RoPE ("ABF"): base 100,000 -> 1,000,000 for 4x the pretraining context. The lower bound of the base
    for a context L derived by Men et al. 2024 ("Base of RoPE Bounds Context Length") is ~6.4e5 at 32K and
    ~2.1e6 at 64K (SmolLM2's own 100,000 sits at their 8K bound); 1e6 covers training at 32K with margin,
    and evaluation at 64K is then a true extrapolation test. `--override model.rotary_base=2000000` trades
    a larger change from the pretrained base for more room at 64K.

    Schedule (continued pre-training, same for all three variants): bf16, AdamW (0.9, 0.95), peak LR 1e-4
    after 6 warm-up steps, cosine to 1e-5, weight decay 0.01, clip 1.0; 32,768-token sequences, micro-batch
    1, global batch 4 (131,072 tokens a step); 60 steps = 7.9M tokens: ~85 s of training for LongGen, ~111 s
    full, ~74 s sparse-only on one H200 (rates measured with random weights of this shape: ~92K, ~71K, ~107K
    tokens/s). Held-out loss every 20 steps on 4 validation sequences."""
    num_layers = 30
    return LongGenConfig(
        name="smollm2_32k",
        model=ModelConfig(
            num_layers=num_layers,
            hidden_size=576,
            num_attention_heads=9,
            num_query_groups=3,
            ffn_hidden_size=1536,
            vocab_size=49152,
            layer_pattern=default_layer_pattern(num_layers),
            rotary_base=1_000_000.0,
            rope_original_max_position=8192,
            norm_epsilon=1e-5,
            tie_embeddings=True,
        ),
        sparse=SparseAttentionConfig(
            variant="sink_window", block_size=64, num_sink_blocks=1, num_window_blocks=32
        ),
        parallel=ParallelConfig(use_distributed_optimizer=False),
        train=TrainingConfig(
            seq_length=32768,
            micro_batch_size=1,
            global_batch_size=4,
            max_steps=60,
            lr=1e-4,
            min_lr=1e-5,
            lr_warmup_steps=6,
            lr_decay_style="cosine",
            weight_decay=0.01,
            dtype="bf16",
            seed=1234,
            log_interval=1,
            eval_interval=20,
            eval_iters=1,
            init_checkpoint=f"{SMOLLM2_WORKDIR}/mcore/original",
        ),
        data=DataConfig(
            blend=f"{SMOLLM2_WORKDIR}/data/train",
            tokenizer=f"{SMOLLM2_WORKDIR}/hf/original",
            valid_fraction=0.02,
        ),
    )


def smollm2_32k_longgen() -> LongGenConfig:
    """`smollm2_32k` under the name the example uses for its LongGen variant."""
    return dataclasses.replace(smollm2_32k(), name="smollm2_32k_longgen")


def smollm2_32k_sparse_only() -> LongGenConfig:
    """The ablation without full layers: all 30 layers `sink_window`, trained identically."""
    base = smollm2_32k()
    model = dataclasses.replace(base.model, layer_pattern="S" * base.model.num_layers)
    return dataclasses.replace(base, name="smollm2_32k_sparse_only", model=model)


def smollm2_32k_full() -> LongGenConfig:
    """The full-attention baseline: all 30 layers full, trained identically."""
    return with_full_attention(smollm2_32k())


RECIPES: dict[str, Callable[[], LongGenConfig]] = {
    "debug_tiny": debug_tiny,
    "debug_tiny_full": debug_tiny_full,
    "llama2_7b_128k": llama2_7b_128k,
    "llama2_7b_128k_full": llama2_7b_128k_full,
    "llama2_7b_128k_pi": llama2_7b_128k_pi,
    "llama2_7b_128k_yarn": llama2_7b_128k_yarn,
    "llama2_70b_128k": llama2_70b_128k,
    "llama2_70b_128k_full": llama2_70b_128k_full,
    "smollm2_32k": smollm2_32k,
    "smollm2_32k_longgen": smollm2_32k_longgen,
    "smollm2_32k_sparse_only": smollm2_32k_sparse_only,
    "smollm2_32k_full": smollm2_32k_full,
}


def get_recipe(name: str) -> LongGenConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name]()
