"""Typed, keyword-only configuration dataclasses for LongGen runs.

(Over 400 lines on purpose: every field of every section with its documentation, in one place a user reads
to learn what a run can set. Parsing overrides and serialisation live in `overrides.py` / `serialization.py`.)

Design choices:
- A handful of small frozen dataclasses (`ModelConfig`, `SparseAttentionConfig`, `ParallelConfig`,
  `TrainingConfig`, `DataConfig`, `LoggingConfig`) grouped in `LongGenConfig`. Each validates itself in
  `__post_init__` and raises `ValueError` naming the offending numbers; cross-field checks live in
  `LongGenConfig.__post_init__`.
- The per-layer attention layout is one string (`ModelConfig.layer_pattern`, `S` sparse / `F` full); see
  `models/layer_pattern.py` for the helpers that derive it.
- `megatron_bridge.to_transformer_config` is the only place Megatron-Core's `TransformerConfig` is filled.
- Named runs are functions in `megatron_longgen/recipes.py`; command-line overrides (`config/overrides.py`)
  and the JSON form stored in checkpoints (`config/serialization.py`) live beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SparseVariant = Literal["sink_window", "block_strided"]
SPARSE_VARIANTS: tuple[str, ...] = ("sink_window", "block_strided")
SPARSE_BACKENDS: tuple[str, ...] = ("auto", "torch", "flex", "triton", "cudnn_bsa", "cudnn_bsa_fwd")
DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
ROPE_SCALINGS: tuple[str, ...] = ("none", "linear", "yarn")
TRANSFORMER_IMPLS: tuple[str, ...] = ("local", "transformer_engine")


def _positive(name: str, value: float) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """Shape of a Llama-2 style decoder (RMSNorm, SwiGLU, RoPE, no biases, optional GQA)."""

    num_layers: int
    """Number of transformer layers (Llama-2 7B: 32, 70B: 80)."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads (GQA). None means multi-head attention (= num_attention_heads)."""
    ffn_hidden_size: int
    """SwiGLU inner width (Llama-2 7B: 11008)."""
    vocab_size: int
    """Tokenizer vocabulary size (before Megatron's padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding table is padded to a multiple of this times the TP size (Megatron convention)."""
    layer_pattern: str
    """One character per layer: `S` sparse attention, `F` full attention. Bottom layer first."""
    rotary_base: float = 10000.0
    """RoPE base. Raised for length extension (ABF); Llama-2 pretrained with 10000."""
    rope_scaling: str = "none"
    """Extra RoPE scaling on top of the base: `none`, `linear` (position interpolation) or `yarn`."""
    rope_scaling_factor: float = 1.0
    """Factor for `linear`/`yarn` scaling (new_context / original_context)."""
    rope_original_max_position: int = 4096
    """Context length the checkpoint was pretrained with (YaRN needs it)."""
    yarn_beta_fast: float = 32.0
    """YaRN: rotations per original context above which a dimension is left unscaled (paper: 32)."""
    yarn_beta_slow: float = 1.0
    """YaRN: rotations per original context below which a dimension is fully interpolated (paper: 1)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (Llama-2: 1e-5)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer (Llama-2: untied)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation for weights trained from scratch."""
    transformer_impl: str = "local"
    """Layer implementation: `local` (Megatron's parallel linears, our RMSNorm; never imports Transformer
    Engine) or `transformer_engine` (TE's fused norm+linear layers, and TE attention for full layers without
    CP; needs TE installed, else a ValueError at model build). Sparse layers always run LongGen's kernels."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            _positive(name, getattr(self, name))
        groups = self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads
        _positive("num_query_groups", groups)
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_query_groups {groups}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        from megatron_longgen.models.layer_pattern import validate_layer_pattern

        validate_layer_pattern(self.layer_pattern, num_layers=self.num_layers)
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base must be > 0, got {self.rotary_base}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(
                f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}"
            )
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling_factor < 1.0:
            raise ValueError(f"rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        _positive("rope_original_max_position", self.rope_original_max_position)
        if not 0 < self.yarn_beta_slow < self.yarn_beta_fast:
            raise ValueError(
                f"need 0 < yarn_beta_slow < yarn_beta_fast, got {self.yarn_beta_slow} and {self.yarn_beta_fast}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True, frozen=True)
class SparseAttentionConfig:
    """The static sparse attention of the `S` layers (LongGen's two variants).

    sink_window:   each query block sees `num_sink_blocks` first blocks and its `num_window_blocks`
                   most recent blocks (itself included), causally.
    block_strided: each query block sees its `num_local_blocks` most recent blocks (itself included)
                   and every `stride_blocks`-th block before it (block 0 is on the stride: a sink).
    """

    variant: str = "sink_window"
    """`sink_window` (AttnSink in the paper) or `block_strided` (BlockSparse)."""
    block_size: int = 64
    """Tokens per sparse block (paper: 64)."""
    num_sink_blocks: int = 1
    """sink_window: leading blocks every query sees (paper: 1 block = 64 tokens)."""
    num_window_blocks: int = 32
    """sink_window: most recent blocks, own block included (paper: 32 = 2,048 tokens)."""
    stride_blocks: int = 64
    """block_strided: distance between strided blocks (paper: 64 blocks = 4,096 tokens)."""
    num_local_blocks: int = 1
    """block_strided: most recent blocks, own block included. The paper does not state it; 1 gives
    2,112 keys per query at 128K (32 strided + 1 local), the same budget as sink_window."""
    backend: str = "auto"
    """Kernel (`attention/backends.py` decides, logged once): `auto` picks the fastest that accepts the device,
    dtype, pattern and head dim: on Hopper with cuDNN frontend `cudnn_bsa`, else `triton`, else `flex`, else
    `torch` (the portable reference path, and `auto` on CPU); `cudnn_bsa_fwd` = cuDNN forward + Triton
    backward (no cuDNN workspace). With context parallelism only `auto`, `flex` and `torch` have a form. A
    named backend that cannot run is a ValueError saying why, never a silent fallback."""

    def __post_init__(self) -> None:
        if self.variant not in SPARSE_VARIANTS:
            raise ValueError(f"sparse variant must be one of {SPARSE_VARIANTS}, got {self.variant!r}")
        if self.backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse backend must be one of {SPARSE_BACKENDS}, got {self.backend!r}")
        _positive("block_size", self.block_size)
        if self.num_sink_blocks < 0:
            raise ValueError(f"num_sink_blocks must be >= 0, got {self.num_sink_blocks}")
        _positive("num_window_blocks", self.num_window_blocks)
        _positive("stride_blocks", self.stride_blocks)
        _positive("num_local_blocks", self.num_local_blocks)


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """Parallel degrees; data parallel size is whatever is left of the world size."""

    tensor_parallel: int = 1
    """Tensor-parallel size (paper: 8)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline_parallel: int | None = None
    """Interleaved-schedule model chunks per pipeline rank (None: plain 1F1B)."""
    context_parallel: int = 1
    """Context-parallel size (sequence split over ranks, zig-zag)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_parallel > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            _positive(name, getattr(self, name))
        if self.virtual_pipeline_parallel is not None and self.virtual_pipeline_parallel < 1:
            raise ValueError(f"virtual_pipeline_parallel must be >= 1, got {self.virtual_pipeline_parallel}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1, got tensor_parallel 1")

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size for `world_size` ranks, or a ValueError naming the numbers."""
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} must be a multiple of tp*pp*cp = "
                f"{self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel} = {model_parallel}"
            )
        return world_size // model_parallel


@dataclass(kw_only=True, frozen=True)
class TrainingConfig:
    """Optimisation and schedule."""

    seq_length: int
    """Tokens per packed training sequence."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 1
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    max_steps: int
    """Optimizer steps."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_decay_style: str = "cosine"
    """`cosine`, `linear` or `constant` after warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    dtype: str = "bf16"
    """Compute dtype: `fp32`, `bf16` or `fp16` (fp32 main params in the optimizer)."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    recompute: str = "none"
    """Activation recomputation: `none`, `selective` (core attention) or `full`."""
    log_interval: int = 1
    """Steps between metric lines."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end)."""
    eval_interval: int = 0
    """Steps between held-out evaluations (0: never)."""
    eval_iters: int = 2
    """Global batches of held-out data per evaluation (always the same ones, so evaluations compare)."""
    keep_last_checkpoints: int = 3
    """How many complete checkpoints `RUN_DIR/checkpoints/` keeps (oldest deleted first; 0 keeps all)."""
    save_on_exit: bool = True
    """Also checkpoint after the last step and when SIGTERM/SIGUSR1 stops the run."""
    nan_policy: str = "stop"
    """Non-finite loss or gradient norm: `stop` (raise with the step number) or `skip` (drop the update,
    count it, and stop once `max_nan_skips` is exceeded)."""
    max_nan_skips: int = 10
    """`skip` policy: non-finite steps tolerated over the whole run before stopping."""
    init_checkpoint: str | None = None
    """Checkpoint folder (e.g. from tools/convert_hf_to_mcore.py) whose `model/` weights initialise a
    fresh run; ignored when `--resume` finds a checkpoint of the run itself."""
    pipeline_layout: str = "balanced"
    """Layers per pipeline stage: `balanced` (contiguous stages of equal estimated cost; full-attention
    layers cost more at long context) or `even` (Megatron's equal layer counts)."""
    async_save: bool | None = None
    """Write checkpoints in the background (Megatron-Core's asynchronous distributed save; `latest` moves only
    once a save is complete): None = wherever it is supported (`checkpointing.async_save_supported`)."""
    optimizer_checkpoint_format: str = "dp_reshardable"
    """How the distributed optimizer's state is saved: `dp_reshardable` (every rank writes its own shard in
    parallel; resumes at another DP size, but not at another TP/PP) or `fully_reshardable` (gathered per
    parameter on DP rank 0: slower and memory-hungry, resumes at any TP/PP/DP)."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "max_steps", "log_interval"):
            _positive(name, getattr(self, name))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"lr_decay_style must be cosine, linear or constant, got {self.lr_decay_style!r}"
            )
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full, got {self.recompute!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.keep_last_checkpoints < 0:
            raise ValueError(f"keep_last_checkpoints must be >= 0, got {self.keep_last_checkpoints}")
        if self.save_interval < 0 or self.eval_interval < 0:
            raise ValueError(
                f"save_interval and eval_interval must be >= 0, got {self.save_interval} and {self.eval_interval}"
            )
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be stop or skip, got {self.nan_policy!r}")
        if self.max_nan_skips < 0:
            raise ValueError(f"max_nan_skips must be >= 0, got {self.max_nan_skips}")
        if self.optimizer_checkpoint_format not in ("dp_reshardable", "fully_reshardable"):
            raise ValueError(
                "optimizer_checkpoint_format must be dp_reshardable or fully_reshardable, got "
                f"{self.optimizer_checkpoint_format!r}"
            )
        if self.pipeline_layout not in ("balanced", "even"):
            raise ValueError(f"pipeline_layout must be balanced or even, got {self.pipeline_layout!r}")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where training tokens come from."""

    corpus: str = "builtin:tiny_stories"
    """A text file (one document per blank-line-separated paragraph group), or `builtin:tiny_stories`,
    the generated corpus that ships with the package."""
    tokenizer: str = "builtin:tiny_sp"
    """A SentencePiece `.model` file, an HF tokenizer folder, or `builtin:tiny_sp` (shipped)."""
    valid_fraction: float = 0.05
    """Share of documents held out for evaluation."""
    blend: str = ""
    """Megatron-Core indexed datasets (`tools/preprocess_data.py` output prefixes) to train on, instead of
    `corpus`: `"PREFIX [PREFIX ...]"` (each weighted by its token count) or `"0.7 PREFIX_A 0.3 PREFIX_B"`.
    Empty: use `corpus`. Samples are packed by Megatron-Core's GPTDataset, seeded by `train.seed`, and
    each prefix is split into train/valid documents by `valid_fraction`."""
    cache_dir: str | None = None
    """Where Megatron-Core caches the sample indices of a `blend` (None: `longgen_index_cache/` next to
    the first prefix). `build_datasets(cache_dir=...)` overrides it, e.g. with a folder in the run dir."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.blend.strip():
            from megatron_longgen.data.blend import parse_blend

            parse_blend(self.blend)  # raises ValueError quoting the bad item
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ValueError("cache_dir must be None or a non-empty path, got an empty string")


@dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    """Where metrics go. W&B is offline unless the user sets WANDB_MODE=online (or has an API key and
    sets `wandb_mode="online"`)."""

    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_project: str = "megatron_longgen"
    wandb_mode: str = "offline"
    """`offline`, `online` or `disabled`; the WANDB_MODE environment variable wins."""
    run_name: str | None = None
    """W&B run name; defaults to the recipe name."""
    wandb_group: str | None = None
    """W&B group shared by the runs of one comparison; defaults to the recipe name without `_full`, so a
    LongGen run and its full-attention baseline share it (WANDB_RUN_GROUP wins)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator for MFU; 0 looks the GPU name up in
    `training/flops.py` (H100/H200 989, A100 312) and reports no MFU when it is unknown (e.g. CPU)."""

    def __post_init__(self) -> None:
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0, got {self.peak_tflops}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")


def _as_tuple(value, kind: type, name: str) -> tuple:
    """A tuple of `kind` from a tuple/list or a comma-separated string (`--override eval.x=4096,8192`)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(kind(item.strip() if isinstance(item, str) else item) for item in items if item != "")
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}, got {value!r}") from None


LONG_CONTEXT_TASKS: tuple[str, ...] = ("passkey", "niah")


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    """Periodic long-context retrieval eval during training (`megatron_longgen.evaluation.long_context`):
    passkey / needle-in-a-haystack samples scored by one teacher-forced forward each."""

    long_context_interval: int = 0
    """Run it every this many steps (0 = never)."""
    long_context_tasks: tuple[str, ...] = ("passkey",)
    """`passkey` and/or `niah` (single needle in the shipped natural-text haystack)."""
    long_context_lengths: tuple[int, ...] = ()
    """Sample lengths in tokens (prompt + answer); empty = train.seq_length."""
    long_context_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Needle depths in [0, 1]."""
    long_context_samples: int = 1
    """Samples per (task, length, depth)."""
    long_context_seed: int = 1234
    """Seed of the samples (the same samples at every eval)."""

    def __post_init__(self) -> None:
        tasks = _as_tuple(self.long_context_tasks, str, "long_context_tasks")
        lengths = _as_tuple(self.long_context_lengths, int, "long_context_lengths")
        depths = _as_tuple(self.long_context_depths, float, "long_context_depths")
        object.__setattr__(self, "long_context_tasks", tasks)
        object.__setattr__(self, "long_context_lengths", lengths)
        object.__setattr__(self, "long_context_depths", depths)
        if self.long_context_interval < 0:
            raise ValueError(f"long_context_interval must be >= 0, got {self.long_context_interval}")
        unknown = sorted(set(tasks) - set(LONG_CONTEXT_TASKS))
        if unknown or not tasks:
            raise ValueError(f"long_context_tasks must be some of {LONG_CONTEXT_TASKS}, got {tasks}")
        if any(length < 64 for length in lengths):
            raise ValueError(f"long_context_lengths must be >= 64 tokens, got {lengths}")
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"long_context_depths must be in [0, 1], got {depths}")
        _positive("long_context_samples", self.long_context_samples)


@dataclass(kw_only=True, frozen=True)
class LongGenConfig:
    """Everything a run needs. Build it with a recipe (`megatron_longgen.recipes`)."""

    name: str
    """Recipe name (used as the default run name)."""
    model: ModelConfig
    sparse: SparseAttentionConfig = field(default_factory=SparseAttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainingConfig
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        tp = self.parallel.tensor_parallel
        if self.model.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads {self.model.num_attention_heads} must be divisible by "
                f"tensor_parallel {tp}"
            )
        if self.model.kv_heads % tp and tp % self.model.kv_heads:
            raise ValueError(
                f"num_query_groups {self.model.kv_heads} and tensor_parallel {tp}: one must divide the other"
            )
        if self.model.kv_heads < tp:
            raise ValueError(f"num_query_groups {self.model.kv_heads} < tensor_parallel {tp}")
        pp = self.parallel.pipeline_parallel
        vpp = self.parallel.virtual_pipeline_parallel or 1
        if self.train.pipeline_layout == "even" and self.model.num_layers % (pp * vpp):
            raise ValueError(
                f"num_layers {self.model.num_layers} must be divisible by pipeline_parallel*virtual = {pp}*{vpp}"
            )
        if self.model.num_layers < pp * vpp:
            raise ValueError(
                f"num_layers {self.model.num_layers} must be >= pipeline_parallel*virtual = {pp}*{vpp}"
            )
        unit, rule = self.sequence_unit()
        if self.train.seq_length % unit:
            raise ValueError(f"seq_length {self.train.seq_length} must be a multiple of {rule}")
        for length in self.eval.long_context_lengths:
            if length % unit:
                raise ValueError(f"eval.long_context_lengths: {length} must be a multiple of {rule}")

    def sequence_unit(self) -> tuple[int, str]:
        """(u, why): every sequence the model runs has a multiple of u tokens (CP's zig-zag chunks, whole
        sparse blocks per chunk)."""
        cp = self.parallel.context_parallel
        if "S" in self.model.layer_pattern and cp > 1:
            unit = 2 * cp * self.sparse.block_size
            return unit, f"2*cp*block_size = 2*{cp}*{self.sparse.block_size} = {unit}"
        if cp > 1:
            return 2 * cp, f"2*cp = {2 * cp}"
        return 1, "1"

    @property
    def is_full_attention(self) -> bool:
        return "S" not in self.model.layer_pattern
