"""Per-GPU memory of a training run: what the PyTorch allocator holds at the step's peak.

The model follows what *this* code path allocates (Megatron-Core's local layer spec with our RMSNorm,
SwiGLU without the fused kernel, flash-style attention kernels that save (out, lse), Megatron's
vocab-parallel cross-entropy, torch AdamW behind the distributed optimizer), checked tensor by tensor
against a tiny GPTModel on CPU (`tests/launch/test_memory.py`) and end to end against the H200 bench
(`benchmarks/results/planner_validation_h200.md`). Notation, bytes per *local* token (a micro-batch of b
sequences of S tokens is T = b*S/cp tokens on each GPU): h hidden, n / g query / KV heads, d head dim,
f SwiGLU width, V padded vocabulary, t = TP size, sigma = 1/t with sequence parallelism (else 1).

Static (per parameter on the GPU, P_local = this pipeline rank's parameters / t):
    weights 2 B (bf16), fp32 gradient buffer 4 B (`grad_reduce_in_fp32`), optimizer 12 B (fp32 main
    params + Adam m, v) / (dp*cp) with the distributed optimizer.

Saved for backward by one layer, recompute `none` (Korthikanti et al. 2022 count the same tensors for GPT:
sbh(34 + 5as/h); ours differ where Llama differs: RMSNorm in fp32, SwiGLU, GQA, no dropout, no s^2 scores):
    2 RMSNorms          sigma * (4h x_fp32 + 4h y_fp32 + 2h bf16 out + 4 rstd)         = sigma*(20h + 8)
    QKV output          2(n+2g)d / t   (kept alive by the V view the attention kernel saves)
    RoPE                2nd/t rotated q + 2gd/t rotated k + 8d (bf16 cos/sin of q and k, not TP-split)
    attention           2nd/t out + 4n/t fp32 log-sum-exp
    SwiGLU MLP          10f/t  (fc1 output 4f, silu 2f, `x_linear + 0` 2f, product 2f)
  `selective` (core attention recomputed) drops only the log-sum-exp: the output stays alive as the input
  of the output projection, and flash kernels never store the s^2 scores that selective recompute was
  designed to drop. `full` keeps one 2h*sigma layer input per layer and recomputes the layer in backward.

Transients (on top of the stored activations, the largest wins):
    layer backward      recomputed layer (full) + its output and incoming gradient (2 x 2h*sigma) +
                        MLP backward 4f/t, or attention backward (dq, dk, dv, d_out; the ring's fp32
                        dq / dK,dV accumulators and K/V double buffers under CP)
    loss                final RMSNorm 10h*sigma + logits: bf16 2V/t and fp32 4V/t in the forward,
                        fp32 softmax 4V/t + bf16 gradient 2V/t in the backward
    sequence parallel   the all-gathered input of a column-parallel linear (2h per token, full T)
    optimizer step      4 B per optimizer-shard parameter (torch's foreach Adam allocates sqrt(v))
Pipeline parallelism: rank r of pp keeps the activations of min(pp - r, m) micro-batches in flight (1F1B;
interleaved: (2(pp - r - 1) + (vpp - 1) pp + 1) / vpp stage-equivalents), plus each one's received input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_longgen.config import LongGenConfig, ModelConfig
from megatron_longgen.launch.layout import Layout, apply_layout, num_microbatches, stage_layer_kinds

GIB = 2**30


# ----------------------------------------------------------------------------------------- parameters
def padded_vocab(model: ModelConfig, *, tp: int) -> int:
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


def layer_parameters(model: ModelConfig) -> dict[str, int]:
    """Parameters of one decoder layer, by module (the whole layer, before TP)."""
    h, d, n, g, f = (
        model.hidden_size,
        model.head_dim,
        model.num_attention_heads,
        model.kv_heads,
        model.ffn_hidden_size,
    )
    return {
        "linear_qkv": h * (n + 2 * g) * d,
        "linear_proj": n * d * h,
        "linear_fc1": h * 2 * f,
        "linear_fc2": f * h,
        "norms": 2 * h,
    }


def model_parameters(model: ModelConfig, *, tp: int = 1) -> dict[str, int]:
    """Whole-model parameter counts (embedding padded the Megatron way for `tp`)."""
    vocab = padded_vocab(model, tp=tp)
    per_layer = sum(layer_parameters(model).values())
    counts = {
        "embedding": vocab * model.hidden_size,
        "layers": model.num_layers * per_layer,
        "final_norm": model.hidden_size,
        "output_layer": 0 if model.tie_embeddings else vocab * model.hidden_size,
    }
    counts["total"] = sum(counts.values())
    return counts


def local_parameters(model: ModelConfig, *, kinds: str, tp: int, first: bool, last: bool) -> float:
    """Parameters held by one GPU of a pipeline rank whose layers are `kinds` (TP-sharded linears and
    vocabulary, replicated norms). With tied embeddings the last rank keeps its own copy (Megatron)."""
    layer = layer_parameters(model)
    linears = sum(v for k, v in layer.items() if k != "norms")
    total = len(kinds) * (linears / tp + layer["norms"])
    vocab_rows = padded_vocab(model, tp=tp) * model.hidden_size / tp
    if first:
        total += vocab_rows
    if last:
        total += model.hidden_size + vocab_rows
    return total


# ----------------------------------------------------------------------------------------- activations
def halo_fraction(cfg: LongGenConfig, *, cp: int, local_tokens: float) -> float:
    """Upper bound of the keys a sparse layer fetches from other CP ranks, as a share of its local tokens:
    sink_window, for each of the two zig-zag chunks the window before it, plus the sinks; block_strided,
    every strided block before the chunks plus the local halo of each chunk."""
    if cp == 1:
        return 0.0
    s = cfg.sparse
    if s.variant == "sink_window":
        blocks = 2 * (s.num_window_blocks - 1) + s.num_sink_blocks
    else:
        blocks = -(-cfg.train.seq_length // (s.stride_blocks * s.block_size)) + 2 * (s.num_local_blocks - 1)
    return blocks * s.block_size / local_tokens


def layer_saved_terms(
    model: ModelConfig,
    *,
    kind: str,
    recompute: str,
    tp: int,
    sp: bool,
    cp_sparse_halo: float | None = None,
    act_bytes: int = 2,
) -> dict[str, float]:
    """Bytes per local token one layer keeps for its backward, by term (module docstring).

    `kind` is 'S' or 'F'; `cp_sparse_halo` is the halo fraction of a sparse layer under CP (its kernel runs
    on a [local | fetched] copy of K/V, and the layer's own K and QKV buffers are then freed), else None.
    """
    if recompute == "full":
        return {"layer_input": act_bytes * model.hidden_size * (1 / tp if sp else 1)}
    h, d, n, g, f = (
        model.hidden_size,
        model.head_dim,
        model.num_attention_heads,
        model.kv_heads,
        model.ffn_hidden_size,
    )
    a, sigma = act_bytes, (1 / tp if sp else 1)
    terms = {
        "norms": sigma * 2 * (4 * h + 4 * h + a * h + 4),
        "rope_cos_sin": 4 * a * d,
        "q_rotated": a * n * d / tp,
        "attn_out": a * n * d / tp,
        "mlp": 5 * a * f / tp,
    }
    if kind == "S" and cp_sparse_halo is not None and recompute == "none":
        terms["kv_gathered"] = 2 * a * g * d * (1 + cp_sparse_halo) / tp
    else:
        terms["k_rotated"] = a * g * d / tp
        terms["qkv"] = a * (n + 2 * g) * d / tp
    if recompute == "none":
        terms["lse"] = 4 * n / tp
    return terms


def attention_backward_transient(
    model: ModelConfig, *, kind: str, tp: int, cp: int, act_bytes: int = 2
) -> float:
    """Bytes per local token the attention backward allocates: dq, dk, dv, d_out and the fused QKV
    gradient; under CP the ring keeps fp32 dq and two travelling fp32 dK/dV buffers plus K/V in flight."""
    d, n, g = model.head_dim, model.num_attention_heads, model.kv_heads
    a = act_bytes
    base = a * (2 * n * d + 2 * g * d) + a * (n + 2 * g) * d
    if cp > 1 and kind == "F":
        base += 4 * n * d + 2 * a * g * d * 2 + 2 * 4 * g * d * 2
    return base / tp


def ring_forward_buffers(model: ModelConfig, *, tp: int, act_bytes: int = 2) -> float:
    """Bytes per local token of a full layer's ring forward: fp32 output and K/V stacked + in flight."""
    d, n, g = model.head_dim, model.num_attention_heads, model.kv_heads
    return (4 * n * d + 2 * 2 * act_bytes * g * d) / tp


# ----------------------------------------------------------------------------------------- estimate
@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Peak memory of one GPU on pipeline rank `stage` (bytes)."""

    stage: int
    layers: str
    parameters: float
    weights: float
    grads: float
    optimizer: float
    activations: float
    """Saved for backward by the micro-batches in flight."""
    in_flight: float
    working: float
    """Transient at the peak on top of `activations` (recompute, backward temporaries, logits, CP)."""
    peak_phase: str
    logits: float = 0.0
    cp_buffers: float = 0.0
    optimizer_step: float = 0.0
    """Transient of the optimizer step (happens when activations are freed)."""

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.static + max(self.activations + self.working, self.optimizer_step)


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak_bytes(self) -> float:
        return self.peak.total


def in_flight_microbatches(*, stage: int, pp: int, vpp: int, num_microbatches: int) -> float:
    """Stage-equivalents of activations rank `stage` holds at once under 1F1B / interleaved 1F1B."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - stage, num_microbatches))
    chunks = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1
    return min(chunks, num_microbatches * vpp) / vpp


def estimate_memory(cfg: LongGenConfig, layout: Layout) -> MemoryPlan:
    """Peak allocated bytes of every pipeline rank for `cfg` run with `layout` (module docstring)."""
    cfg = apply_layout(cfg, layout)
    m = cfg.model
    tp, cp, sp = layout.tp, layout.cp, layout.sp
    a = 4 if cfg.train.dtype == "fp32" else 2
    tokens = layout.micro_batch_size * cfg.train.seq_length / cp
    micro = num_microbatches(cfg, layout)
    sigma = 1 / tp if sp else 1
    vocab = padded_vocab(m, tp=tp)
    h, f = m.hidden_size, m.ffn_hidden_size
    halo = halo_fraction(cfg, cp=cp, local_tokens=tokens)
    opt_shard = layout.dp * cp if layout.distributed_optimizer else 1
    optimizer_bytes_per_param = 12 if a == 2 else 8
    stages = []
    kinds_per_rank = stage_layer_kinds(cfg, layout)
    for r, kinds in enumerate(kinds_per_rank):
        first, last = r == 0, r == layout.pp - 1
        params = local_parameters(m, kinds=kinds, tp=tp, first=first, last=last)

        def saved(kind: str, mode: str) -> float:
            terms = layer_saved_terms(
                m,
                kind=kind,
                recompute=mode,
                tp=tp,
                sp=sp,
                act_bytes=a,
                cp_sparse_halo=halo if (cp > 1 and kind == "S") else None,
            )
            return sum(terms.values())

        per_mb = sum(saved(k, layout.recompute) for k in kinds) + 4 * m.head_dim  # + fp32 RoPE table
        if not first:
            per_mb += a * h * sigma  # received input kept for its gradient
        flight = in_flight_microbatches(stage=r, pp=layout.pp, vpp=layout.vpp, num_microbatches=micro)
        activations = flight * per_mb * tokens
        grads_io = 2 * a * h * sigma  # a layer's output (recomputed) and the gradient flowing in
        gather = a * h if sp else 0.0
        working, phase, cp_buf = 0.0, "", 0.0
        for kind in sorted(set(kinds)):
            none_terms = layer_saved_terms(
                m,
                kind=kind,
                recompute="none",
                tp=tp,
                sp=sp,
                act_bytes=a,
                cp_sparse_halo=halo if (cp > 1 and kind == "S") else None,
            )
            # Full recompute rebuilds the whole layer in its backward; otherwise it is already stored.
            recomputed = sum(none_terms.values()) if layout.recompute == "full" else 0.0
            mlp_phase = recomputed + grads_io + 2 * a * f / tp + gather
            # The attention backward runs once the MLP's and the second norm's tensors are freed.
            freed = none_terms["mlp"] + none_terms["norms"] / 2
            attn_transient = attention_backward_transient(m, kind=kind, tp=tp, cp=cp, act_bytes=a)
            attn_phase = recomputed - freed + grads_io + attn_transient + gather
            ring_fwd = ring_forward_buffers(m, tp=tp, act_bytes=a) if (cp > 1 and kind == "F") else 0.0
            for name, value in (
                (f"{kind} layer backward (MLP)", mlp_phase),
                (f"{kind} layer backward (attention)", attn_phase),
                (f"{kind} ring forward", ring_fwd + gather),
            ):
                if value * tokens > working:
                    working, phase = value * tokens, name
            if cp > 1 and kind == "F":
                cp_buf = max(cp_buf, (attn_transient + ring_fwd) * tokens)
        logits = 0.0
        if last:
            # Final RMSNorm (fp32 x and y, bf16 out, rstd) + logits: bf16 and fp32 copies in the forward,
            # the fp32 softmax and the bf16 gradient in the backward: (a + 4) V / t either way.
            logits = (sigma * (8 * h + a * h + 4) + (a + 4) * vocab / tp + gather) * tokens
            if logits > working:
                working, phase = logits, "loss (logits + cross-entropy)"
        opt_params = params / opt_shard
        stages.append(
            StageMemory(
                stage=r,
                layers=kinds,
                parameters=params,
                weights=a * params,
                grads=4 * params,
                optimizer=optimizer_bytes_per_param * opt_params,
                activations=activations,
                in_flight=flight,
                working=working,
                peak_phase=phase,
                logits=logits,
                cp_buffers=cp_buf,
                optimizer_step=4 * opt_params,
            )
        )
    return MemoryPlan(stages=stages)
