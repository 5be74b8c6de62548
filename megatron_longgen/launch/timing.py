"""Step time of a training run from its FLOPs, bytes and messages, at rates this project measured.

One optimizer step on the slowest pipeline rank (notation as in `memory.py`; T local tokens per
micro-batch, m micro-batches per data-parallel rank):

    compute per micro-batch, per layer:
        GEMMs          linear FLOPs (`training/flops.py`) / t at the GEMM rate: forward 1x, backward 2x
        attention      attended pairs (`attention.masks.attended_pairs`: S(S+1)/2 full, the kept blocks
                       sparse) x 4nd / (t * cp), forward and backward (2.5x forward) each at the executed
                       kernel's own measured rate (`gpus.py`): cuDNN for full layers, the sparse backend
                       for S layers (FlexAttention under CP)
        element-wise   bytes moved by the RMSNorms, RoPE, residual adds and SwiGLU (forward
                       sigma*68h + (21(n+g)d + 14f)/t per token, backward 2x) at the achieved HBM rate
        recompute      `full`: the layer's forward again; `selective`: the attention forward again
    communication (Megatron's schedules as this trainer configures them: nothing overlapped but the ring):
        TP             sequence parallel: all-gather / reduce-scatter of a*h*T bytes, 4 in the forward,
                       6 in the backward (the input is gathered again for the weight gradient)
        CP, full       ring attention: K/V of T tokens hop cp-1 times in the forward, K/V and fp32 dK/dV
                       in the backward (dK/dV one hop more, back to their owner); each hop overlaps one
                       step's attention, so only max(0, hop - step) is exposed
        CP, sparse     the halo of fetched K/V blocks (before the kernel; dK/dV back after it)
        PP             one activation and one gradient per micro-batch and stage boundary
    per step:
        bubble         (pp - 1) / vpp micro-batch slots of the slowest rank (1F1B)
        DP             reduce-scatter of fp32 gradients and all-gather of bf16 weights over dp x cp
        optimizer      ~98 B per optimizer-shard parameter (torch foreach Adam, clip, copy to bf16), the
                       bf16 -> fp32 gradient accumulation (10 B per parameter and micro-batch) and the
                       trainer's finite-gradient check, at the HBM rate
Collectives cost `alpha * (p - 1) + (p - 1) / p * bytes / bandwidth` with NVLink inside a node and
InfiniBand across nodes (`layout.placement`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longgen.config import LongGenConfig
from megatron_longgen.launch.gpus import GpuSpec
from megatron_longgen.launch.layout import (
    Layout,
    apply_layout,
    num_microbatches,
    placement,
    stage_layer_kinds,
)
from megatron_longgen.launch.memory import halo_fraction, local_parameters, padded_vocab


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """Predicted seconds of one optimizer step, by component (sums over the step)."""

    gemm: float
    attention: float
    elementwise: float
    recompute: float
    tp_comm: float
    cp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float
    optimizer: float
    microbatch_s: float
    """Forward + backward (+ recompute, + communication) of one micro-batch on the slowest rank."""
    num_microbatches: int

    @property
    def total(self) -> float:
        return (
            self.gemm
            + self.attention
            + self.elementwise
            + self.recompute
            + self.tp_comm
            + self.cp_comm
            + self.pp_comm
            + self.bubble
            + self.dp_comm
            + self.optimizer
        )


def collective_s(
    *, size: int, nbytes: float, bandwidth_gbps: float, latency_s: float, allreduce: bool = False
) -> float:
    """Ring all-gather / reduce-scatter (allreduce: twice the traffic) of `nbytes` over `size` ranks."""
    if size <= 1:
        return 0.0
    factor = 2.0 if allreduce else 1.0
    return latency_s * (size - 1) * factor + factor * (size - 1) / size * nbytes / (bandwidth_gbps * 1e9)


def elementwise_bytes_per_token(cfg: LongGenConfig, *, tp: int, sp: bool) -> float:
    """Forward bytes moved by one layer's element-wise ops for one local token (module docstring)."""
    m = cfg.model
    sigma = 1 / tp if sp else 1
    return (
        sigma * 68 * m.hidden_size
        + (21 * (m.num_attention_heads + m.kv_heads) * m.head_dim + 14 * m.ffn_hidden_size) / tp
    )


def cp_exposed_seconds(
    *,
    attn_fwd_s: float,
    attn_bwd_s: float,
    kind: str,
    cp: int,
    kv_token_elems: float,
    act_bytes: int,
    local_tokens: float,
    halo_tokens: float,
    bandwidth_gbps: float,
    latency_s: float,
) -> tuple[float, float]:
    """(forward, backward) seconds of CP communication one attention layer does *not* hide.

    Full layers (ring): K/V of the local tokens hop cp - 1 times, each hop overlapping one ring step's
    kernel (1/cp of the layer's attention), so a hop costs max(0, hop - step); in the backward K/V (bf16)
    and dK/dV (fp32) travel together and dK/dV make one last hop back to their owner after the last step.
    Sparse layers: the fetched halo (`halo_tokens` keys) before the kernel, its dK/dV back after it.
    `kv_token_elems` = K and V elements per token on this GPU (2 * kv_heads / tp * head_dim).
    """
    if cp == 1:
        return 0.0, 0.0
    bw = bandwidth_gbps * 1e9
    if kind == "F":
        hop_f = kv_token_elems * act_bytes * local_tokens / bw + latency_s
        hop_b = kv_token_elems * (act_bytes + 4) * local_tokens / bw + latency_s
        steps = cp - 1
        fwd = steps * max(0.0, hop_f - attn_fwd_s / cp)
        bwd = steps * max(0.0, hop_b - attn_bwd_s / cp) + kv_token_elems * 4 * local_tokens / bw + latency_s
        return fwd, bwd
    fwd = kv_token_elems * act_bytes * halo_tokens / bw + 2 * latency_s
    bwd = kv_token_elems * 4 * halo_tokens / bw + 2 * latency_s
    return fwd, bwd


def cp_attention_seconds(*, attn_fwd_s: float, attn_bwd_s: float, **kwargs) -> float:
    """Forward + backward seconds of one attention layer under CP: its per-rank kernels (`attn_*_s`, already
    divided by cp) plus the exposed communication (`cp_exposed_seconds`, same keywords)."""
    fwd, bwd = cp_exposed_seconds(attn_fwd_s=attn_fwd_s, attn_bwd_s=attn_bwd_s, **kwargs)
    return attn_fwd_s + attn_bwd_s + fwd + bwd


def _attention_rates(cfg: LongGenConfig, gpu: GpuSpec, *, kind: str, cp: int) -> tuple[float, float]:
    if kind == "F":
        return gpu.dense_attn_tflops
    backend = "flex" if cp > 1 else cfg.sparse.backend
    return gpu.sparse_rate(cfg.sparse.variant, backend)


def estimate_step_time(
    cfg: LongGenConfig, layout: Layout, gpu: GpuSpec, *, gpus_per_node: int = 8
) -> StepTime:
    """Seconds of one optimizer step of `cfg` under `layout` on `gpu` (module docstring)."""
    from megatron_longgen.training.flops import (
        attended_pairs_per_layer,
        attention_flops_per_pair,
        linear_flops_per_token_per_layer,
    )

    cfg = apply_layout(cfg, layout)
    m, t = cfg.model, cfg.train
    tp, cp, pp, sp = layout.tp, layout.cp, layout.pp, layout.sp
    a = 4 if t.dtype == "fp32" else 2
    micro = num_microbatches(cfg, layout)
    tokens = layout.micro_batch_size * t.seq_length / cp
    where = placement(layout, gpus_per_node=gpus_per_node)

    def link(group: str) -> tuple[float, float]:
        intra = where[group]
        return (gpu.nvlink_gbps, gpu.intra_latency_s) if intra else (gpu.ib_gbps, gpu.inter_latency_s)

    tp_bw, tp_lat = link("tp")
    cp_bw, cp_lat = link("cp")
    mm, hbm = gpu.matmul_tflops * 1e12, gpu.hbm_gbps * 1e9
    pairs = dict(
        zip(m.layer_pattern, attended_pairs_per_layer(model=m, sparse=cfg.sparse, seq_length=t.seq_length))
    )
    per_pair = attention_flops_per_pair(m)
    lin = tokens * linear_flops_per_token_per_layer(m) / tp / mm
    elem = tokens * elementwise_bytes_per_token(cfg, tp=tp, sp=sp) / hbm
    act_bytes = a * m.hidden_size * tokens
    if sp:
        tp_fwd = 4 * collective_s(size=tp, nbytes=act_bytes, bandwidth_gbps=tp_bw, latency_s=tp_lat)
        tp_bwd = 6 * collective_s(size=tp, nbytes=act_bytes, bandwidth_gbps=tp_bw, latency_s=tp_lat)
    else:
        tp_fwd = 2 * collective_s(
            size=tp, nbytes=act_bytes, bandwidth_gbps=tp_bw, latency_s=tp_lat, allreduce=True
        )
        tp_bwd = tp_fwd
    kv_token = 2 * m.kv_heads / tp * m.head_dim  # K and V elements per token
    halo = halo_fraction(cfg, cp=cp, local_tokens=tokens)

    def layer(kind: str) -> dict[str, float]:
        """Seconds of one layer of `kind` for one micro-batch: forward pieces and backward pieces."""
        rate_f, rate_b = _attention_rates(cfg, gpu, kind=kind, cp=cp)
        attn_flops = layout.micro_batch_size * pairs[kind] * per_pair / (tp * cp)
        attn_f = attn_flops / (rate_f * 1e12)
        attn_b = 2.5 * attn_flops / (rate_b * 1e12)
        cp_f, cp_b = cp_exposed_seconds(
            attn_fwd_s=attn_f,
            attn_bwd_s=attn_b,
            kind=kind,
            cp=cp,
            kv_token_elems=kv_token,
            act_bytes=a,
            local_tokens=tokens,
            halo_tokens=halo * tokens,
            bandwidth_gbps=cp_bw,
            latency_s=cp_lat,
        )
        return {
            "gemm_f": lin,
            "attn_f": attn_f,
            "elem_f": elem,
            "tp_f": tp_fwd,
            "cp_f": cp_f,
            "gemm_b": 2 * lin,
            "attn_b": attn_b,
            "elem_b": 2 * elem,
            "tp_b": tp_bwd,
            "cp_b": cp_b,
        }

    costs = {kind: layer(kind) for kind in set(m.layer_pattern)}
    vocab = padded_vocab(m, tp=tp)
    head_gemm = 3 * 2 * tokens * m.hidden_size * vocab / tp / mm
    head_elem = tokens * (52 * vocab / tp + 3 * 28 * m.hidden_size * (1 / tp if sp else 1)) / hbm

    best = None
    for r, kinds in enumerate(stage_layer_kinds(cfg, layout)):
        parts = dict.fromkeys(("gemm", "attention", "elementwise", "recompute", "tp", "cp"), 0.0)
        for kind in kinds:
            c = costs[kind]
            parts["gemm"] += c["gemm_f"] + c["gemm_b"]
            parts["attention"] += c["attn_f"] + c["attn_b"]
            parts["elementwise"] += c["elem_f"] + c["elem_b"]
            parts["tp"] += c["tp_f"] + c["tp_b"]
            parts["cp"] += c["cp_f"] + c["cp_b"]
            if t.recompute == "full":
                parts["recompute"] += c["gemm_f"] + c["attn_f"] + c["elem_f"] + c["tp_f"] + c["cp_f"]
            elif t.recompute == "selective":
                parts["recompute"] += c["attn_f"] + c["cp_f"]
        if r == pp - 1:
            parts["gemm"] += head_gemm
            parts["elementwise"] += head_elem
        total = sum(parts.values())
        if best is None or total > best[0]:
            best = (total, parts, r)
    per_mb, parts, slow_rank = best

    pp_bw, pp_lat = link("pp")
    pp_comm = 0.0
    if pp > 1:
        pp_comm = micro * 2 * (pp_lat + act_bytes * (1 / tp if sp else 1) / (pp_bw * 1e9))
    bubble = (pp - 1) / layout.vpp * per_mb

    dp_size = layout.dp * cp
    dp_bw, dp_lat = link("dp_cp")
    kinds = stage_layer_kinds(cfg, layout)[slow_rank]
    params = local_parameters(m, kinds=kinds, tp=tp, first=slow_rank == 0, last=slow_rank == pp - 1)
    if layout.distributed_optimizer:
        dp_comm = collective_s(
            size=dp_size, nbytes=4 * params, bandwidth_gbps=dp_bw, latency_s=dp_lat
        ) + collective_s(size=dp_size, nbytes=a * params, bandwidth_gbps=dp_bw, latency_s=dp_lat)
        shard = params / dp_size
    else:
        dp_comm = collective_s(
            size=dp_size, nbytes=4 * params, bandwidth_gbps=dp_bw, latency_s=dp_lat, allreduce=True
        )
        shard = params
    optimizer = (98 * shard + 9 * params + 10 * micro * params) / hbm

    return StepTime(
        gemm=micro * parts["gemm"],
        attention=micro * parts["attention"],
        elementwise=micro * parts["elementwise"],
        recompute=micro * parts["recompute"],
        tp_comm=micro * parts["tp"],
        cp_comm=micro * parts["cp"],
        pp_comm=pp_comm,
        bubble=bubble,
        dp_comm=dp_comm,
        optimizer=optimizer,
        microbatch_s=per_mb,
        num_microbatches=micro,
    )
