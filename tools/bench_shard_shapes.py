"""One GPU's shard of a LongGen layer under TP x CP, timed and measured on one GPU (no communication).
(A self-contained benchmark CLI, hence its length.)

    python tools/bench_shard_shapes.py                 # 7B at TP x CP = 8 and 70B at TP8 x CP 1|2, 128K (~3 min)
    python tools/bench_shard_shapes.py --models 70b --shards 8x1 8x2 --recompute none full
    python tools/bench_shard_shapes.py --tiny          # CPU smoke run (seconds)

What one GPU computes for one layer of a run at tensor parallelism t and context parallelism c, without the
communication: a layer of the project's own spec (`build_block_spec` through the model builder, the same
core-attention modules as training) built at TP = CP = 1 with one GPU's dimensions,

    query heads N/t, KV heads G/t, head dim d = h/N (unchanged), SwiGLU width f/t, local tokens T = S/c;
    linear_qkv  h -> (N/t + 2G/t) d   (column-parallel: output split)
    linear_proj N/t d -> h            (row-parallel: input split, full-width partial sums)
    linear_fc1  h -> 2 f/t            (column-parallel)      linear_fc2  f/t -> h   (row-parallel)
    RMSNorms and the residual stream keep the full width h,

as a pipeline middle stage (no embedding, no output layer) of `--layers` layers of one kind (`F` or `S`), in
bf16. Per layer it reports forward and backward time (median of `--iters`), the bytes saved for backward
(counted with saved-tensor hooks, weights excluded), the transient peak above them, weights and gradients.

Attention under CP. A ring (F layers) or the KV-reduced exchange (S layers) gives each of the c ranks about
1/c of the layer's attention work over the whole sequence (zig-zag balancing), which is not the attention of
T tokens among themselves (for F layers that is c times less work). So for c > 1 the core attention module of
the layer is also timed alone at S tokens and at T tokens, and `compute_s_per_layer` = layer(T) - attention(T)
+ attention(S) / c.

Left out, by construction (stated in the JSON as `left_out`): all communication (TP all-gathers and
reduce-scatters, CP ring hops and halo exchanges, PP sends, DP gradient reduction); sequence parallelism (with
it, the RMSNorms, residual adds and their saved activations cover T/t tokens, here T: the norm/residual parts of
time and activation memory are t times what a sequence-parallel run has); the ring's per-step kernel split and
its K/V double buffers and fp32 dK/dV accumulators; the embedding, output layer and loss; the optimizer step
and the fp32 gradient buffers of Megatron's DDP (gradients here are bf16 `.grad`).

Writes `benchmarks/results/shard_shapes_<device>.json` after every row (one row per model x TPxCP x recompute x
kind; the fields are described in `ROW_FIELDS`, copied into the file as `row_fields`), and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

LEFT_OUT = [
    "communication: TP all-gather/reduce-scatter, CP ring hops and sparse halo exchange, PP sends, DP reduction",
    "sequence parallelism: norms/residual (time and saved activations) cover T tokens here, T/t with SP",
    "ring attention's per-step kernel split, K/V double buffers and fp32 dK/dV accumulators (CP > 1)",
    "embedding, output layer and loss; optimizer step; DDP's fp32 gradient buffers (grads here are bf16 .grad)",
]
ROW_FIELDS = {
    "model": "7b | 70b | tiny",
    "tp": "tensor-parallel size the shard is cut for",
    "cp": "context-parallel size (local tokens = seq_len / cp)",
    "kind": "F (full attention) | S (sparse)",
    "recompute": "none | selective | full (Megatron's activation recomputation inside the block)",
    "shard": "{hidden, heads, kv_heads, head_dim, ffn, local_tokens}: one GPU's layer dimensions",
    "fwd_s_per_layer / bwd_s_per_layer": "median seconds of one layer's forward / backward (recompute included)",
    "attention": "c > 1: {local_fwd_bwd_s: core attention at T tokens, full_seq_fwd_bwd_s: at S tokens}",
    "compute_s_per_layer": "fwd + bwd, attention replaced by attention(S)/c when c > 1",
    "flops_per_layer": "model FLOPs of the shard's layer (fwd + bwd = 3x fwd; attention pairs / (t c))",
    "tflops_per_s": "flops_per_layer / compute_s_per_layer / 1e12",
    "weight_bytes_per_layer / grad_bytes_per_layer": "bf16 parameters and their .grad",
    "saved_bytes_per_layer": "activations saved for backward (storages counted once, weights excluded)",
    "peak_transient_bytes": "GPU: peak allocated during fwd+bwd above weights + grads + input (null on CPU)",
    "peak_mem_gib": "GPU: peak allocated of the whole measured block (null on CPU)",
}
MODELS = ("7b", "70b")
DEFAULT_SHARDS = {"7b": ("8x1", "4x2", "2x4", "1x8"), "70b": ("8x1", "8x2"), "tiny": ("2x1", "1x2", "2x2")}


def base_config(model: str):
    """The run whose shards are measured: the 7B / 70B recipes, or a tiny stand-in for CPU smoke runs."""
    from megatron_longgen.config import apply_overrides
    from megatron_longgen.recipes import debug_tiny, llama2_7b_128k, llama2_70b_128k

    if model == "7b":
        return llama2_7b_128k()
    if model == "70b":
        return llama2_70b_128k()
    if model == "tiny":
        return apply_overrides(
            debug_tiny(),
            [
                "model.num_query_groups=2",
                "model.ffn_hidden_size=256",
                "train.seq_length=512",
                "sparse.num_window_blocks=2",
            ],
        )
    raise ValueError(f"model must be one of {(*MODELS, 'tiny')}, got {model!r}")


def parse_shard(text: str) -> tuple[int, int]:
    """'TPxCP' (e.g. '8x1') -> (8, 1)."""
    try:
        tp, cp = (int(x) for x in text.lower().split("x"))
    except ValueError as err:
        raise ValueError(f"shard {text!r} must look like TPxCP, e.g. 8x1") from err
    if tp < 1 or cp < 1:
        raise ValueError(f"shard {text!r}: TP and CP must be >= 1")
    return tp, cp


def shard_config(
    base, *, tp: int, cp: int, kind: str, num_layers: int, dtype: str, recompute: str, backend: str
):
    """(LongGenConfig, TransformerConfig) of one GPU's shard: TP=CP=1, `num_layers` layers of `kind`, heads
    and SwiGLU width divided by `tp`, `seq_length / cp` tokens; head dim kept (`kv_channels` set explicitly,
    since hidden / (N/t) would not be it)."""
    from megatron_longgen.megatron_bridge import to_transformer_config

    m, s = base.model, base.train.seq_length
    for name, value in (
        ("num_attention_heads", m.num_attention_heads),
        ("num_query_groups", m.kv_heads),
        ("ffn_hidden_size", m.ffn_hidden_size),
    ):
        if value % tp:
            raise ValueError(f"{name} {value} is not divisible by tp {tp}: no such TP shard")
    unit = 2 * cp * (base.sparse.block_size if kind == "S" else 1)
    if cp > 1 and s % unit:
        raise ValueError(f"seq_length {s} must be a multiple of 2*cp*block = {unit} for cp {cp}")
    model = dataclasses.replace(
        m,
        num_layers=num_layers,
        layer_pattern=kind * num_layers,
        num_attention_heads=m.num_attention_heads // tp,
        num_query_groups=m.kv_heads // tp,
        ffn_hidden_size=m.ffn_hidden_size // tp,
    )
    parallel = dataclasses.replace(
        base.parallel,
        tensor_parallel=1,
        pipeline_parallel=1,
        context_parallel=1,
        virtual_pipeline_parallel=None,
        sequence_parallel=False,
        use_distributed_optimizer=False,
    )
    train = dataclasses.replace(
        base.train,
        seq_length=s // cp,
        micro_batch_size=1,
        global_batch_size=1,
        dtype=dtype,
        recompute=recompute,
    )
    sparse = dataclasses.replace(base.sparse, backend=backend)
    cfg = dataclasses.replace(
        base, name=f"shard_tp{tp}_cp{cp}_{kind}", model=model, parallel=parallel, train=train, sparse=sparse
    )
    tcfg = to_transformer_config(cfg)
    tcfg.kv_channels = m.head_dim  # Megatron reads it when it builds the attention projections
    return cfg, tcfg


def shard_flops(base, *, tp: int, cp: int, kind: str) -> float:
    """Training FLOPs (fwd + bwd) of one layer's shard: linear FLOPs of T tokens / t, attention pairs / (t c)."""
    from megatron_longgen.training.flops import (
        attended_pairs_per_layer,
        attention_flops_per_pair,
        linear_flops_per_token_per_layer,
    )

    m, s = base.model, base.train.seq_length
    one = dataclasses.replace(m, num_layers=1, layer_pattern=kind)
    pairs = attended_pairs_per_layer(model=one, sparse=base.sparse, seq_length=s)[0]
    forward = (s / cp) * linear_flops_per_token_per_layer(m) / tp + pairs * attention_flops_per_pair(m) / (
        tp * cp
    )
    return 3.0 * forward


class SavedBytes:
    """Counts the bytes autograd saves for backward inside the `with` block, each storage once, parameters
    excluded (they are the weights, not activations)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def __enter__(self):
        import torch

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.exclude:
                self.storages[ptr] = storage.nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_core_attention(
    core, *, tokens: int, heads: int, kv_heads: int, head_dim: int, device, dtype, iters: int, warmup: int
) -> float:
    """Median seconds of forward + backward of a core-attention module alone at `tokens` tokens ([s, b, n, d])."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(tokens, 1, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(tokens, 1, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    grad = torch.randn(tokens, 1, heads * head_dim, device=device, dtype=dtype, generator=gen)
    times = []
    for i in range(warmup + iters):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        _sync(device)
        start = time.perf_counter()
        core(qq, kk, vv, None).backward(grad)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_shard(
    base,
    *,
    model_name: str,
    tp: int,
    cp: int,
    kind: str,
    num_layers: int,
    recompute: str,
    backend: str,
    dtype: str,
    iters: int,
    warmup: int,
    device,
) -> dict:
    """One row of the results (see ROW_FIELDS)."""
    import torch

    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    cfg, tcfg = shard_config(
        base,
        tp=tp,
        cp=cp,
        kind=kind,
        num_layers=num_layers,
        dtype=dtype,
        recompute=recompute,
        backend=backend,
    )
    initialize_model_parallel(cfg)
    set_seed(1234)
    model = build_model(cfg, transformer_config=tcfg, pre_process=False, post_process=False).to(device)
    torch_dtype = next(model.parameters()).dtype
    tokens, h = cfg.train.seq_length, cfg.model.hidden_size
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, 1, h, device=device, dtype=torch_dtype, generator=gen).requires_grad_()
    grad = torch.randn(tokens, 1, h, device=device, dtype=torch_dtype, generator=gen)

    def forward():
        model.set_input_tensor(x)
        return model(None, None, None)

    fwd, bwd = [], []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        out = forward()
        _sync(device)
        t1 = time.perf_counter()
        out.backward(grad)
        _sync(device)
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        del out
    # Memory, in an untimed iteration: grads already exist (accumulated in place), so what grows is activations.
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    exclude = {p.untyped_storage().data_ptr() for p in params} | {x.untyped_storage().data_ptr()}
    peak_transient = peak_gib = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    with SavedBytes(exclude) as saved:
        out = forward()
    out.backward(grad)
    del out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        peak_gib = peak / 2**30
        peak_transient = max(0, peak - base_alloc - saved.total)

    m = cfg.model
    fwd_s, bwd_s = statistics.median(fwd) / num_layers, statistics.median(bwd) / num_layers
    row = {
        "model": model_name,
        "tp": tp,
        "cp": cp,
        "kind": kind,
        "recompute": recompute,
        "dtype": dtype,
        "seq_len": base.train.seq_length,
        "num_layers_measured": num_layers,
        "shard": {
            "hidden": h,
            "heads": m.num_attention_heads,
            "kv_heads": m.kv_heads,
            "head_dim": tcfg.kv_channels,
            "ffn": m.ffn_hidden_size,
            "local_tokens": tokens,
        },
        "sparse": None if kind == "F" else {"variant": cfg.sparse.variant, "backend": _backend_used(model)},
        "fwd_s_per_layer": fwd_s,
        "bwd_s_per_layer": bwd_s,
        "fwd_bwd_s_per_layer": fwd_s + bwd_s,
        "weight_bytes_per_layer": weight_bytes / num_layers,
        "grad_bytes_per_layer": grad_bytes / num_layers,
        "saved_bytes_per_layer": saved.total / num_layers,
        "peak_transient_bytes": peak_transient,
        "peak_mem_gib": peak_gib,
    }
    compute = fwd_s + bwd_s
    if cp > 1:
        core = model.decoder.layers[0].self_attention.core_attention
        args = {
            "heads": m.num_attention_heads,
            "kv_heads": m.kv_heads,
            "head_dim": tcfg.kv_channels,
            "device": device,
            "dtype": torch_dtype,
            "iters": iters,
            "warmup": warmup,
        }
        local = time_core_attention(core, tokens=tokens, **args)
        whole = time_core_attention(core, tokens=base.train.seq_length, **args)
        row["attention"] = {"local_fwd_bwd_s": local, "full_seq_fwd_bwd_s": whole}
        compute = compute - local + whole / cp
    row["compute_s_per_layer"] = compute
    row["flops_per_layer"] = shard_flops(base, tp=tp, cp=cp, kind=kind)
    row["tflops_per_s"] = row["flops_per_layer"] / compute / 1e12
    return row


def _backend_used(model) -> str | None:
    """The backend the sparse layers resolved to (`LongGenCoreAttention.resolved`, logged by the trainer too)."""
    for module in model.modules():
        resolved = getattr(module, "resolved", None)
        if resolved is not None and getattr(module, "kind", None) == "sparse":
            return resolved.name
    return None


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'model':<6}{'TPxCP':>7}{'kind':>5}{'recomp':>8}{'tokens':>8}{'fwd ms':>9}{'bwd ms':>9}"
        f"{'compute ms':>11}{'TF/s':>7}{'saved GiB':>10}{'transient':>10}{'peak GiB':>9}"
    )
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<6}{r['tp']:>4}x{r['cp']:<2}{r['kind']:>5}  {r['error'][:70]}")
            continue
        gib = 2**30
        transient = "-" if r["peak_transient_bytes"] is None else f"{r['peak_transient_bytes'] / gib:.2f}"
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(
            f"{r['model']:<6}{r['tp']:>4}x{r['cp']:<2}{r['kind']:>5}{r['recompute']:>8}{r['shard']['local_tokens']:>8}"
            f"{r['fwd_s_per_layer'] * 1e3:>9.1f}{r['bwd_s_per_layer'] * 1e3:>9.1f}{r['compute_s_per_layer'] * 1e3:>11.1f}"
            f"{r['tflops_per_s']:>7.0f}{r['saved_bytes_per_layer'] / gib:>10.2f}{transient:>10}{peak:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=(*MODELS, "tiny"))
    p.add_argument(
        "--shards",
        nargs="+",
        default=None,
        help="TPxCP list (default per model: 7b 8x1 4x2 2x4 1x8, 70b 8x1 8x2)",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="sequence length S (default: the recipe's, 131072)"
    )
    p.add_argument("--layers", type=int, default=2, help="layers of one kind per measured block")
    p.add_argument("--kinds", nargs="+", default=["F", "S"], choices=("F", "S"))
    p.add_argument("--recompute", nargs="+", default=["none"], choices=("none", "selective", "full"))
    p.add_argument("--sparse-variant", default=None, choices=("sink_window", "block_strided"))
    p.add_argument("--backend", default="auto", help="sparse kernel backend")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny model, fp32, 512 tokens")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/shard_shapes_<device>.json)"
    )
    args = p.parse_args(argv)

    import torch

    from megatron_longgen.config import apply_overrides
    from megatron_longgen.utils.distributed import destroy, init_distributed

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench_shard_shapes: needs a CUDA GPU (or --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    models = ["tiny"] if args.tiny else args.models
    dtype = "bf16" if cuda else "fp32"
    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    slug = device_name.split()[-1].lower() if cuda else "cpu"
    out = Path(args.out or f"benchmarks/results/shard_shapes_{slug}.json")
    result = {
        "device": device_name,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
        },
        "dtype": dtype,
        "iters": args.iters,
        "warmup": args.warmup,
        "what": "one GPU's shard of one layer (TP=CP=1 build with per-GPU dims), compute only; see left_out",
        "left_out": LEFT_OUT,
        "row_fields": ROW_FIELDS,
        "rows": [],
    }
    started = time.perf_counter()
    try:
        for name in models:
            base = base_config(name)
            extra = [f"train.seq_length={args.seq_len}"] if args.seq_len else []
            if args.sparse_variant:
                extra.append(f"sparse.variant={args.sparse_variant}")
            base = apply_overrides(base, extra) if extra else base
            for shard in args.shards or DEFAULT_SHARDS[name]:
                tp, cp = parse_shard(shard)
                for recompute in args.recompute:
                    for kind in args.kinds:
                        try:
                            row = measure_shard(
                                base,
                                model_name=name,
                                tp=tp,
                                cp=cp,
                                kind=kind,
                                num_layers=args.layers,
                                recompute=recompute,
                                backend=args.backend,
                                dtype=dtype,
                                iters=args.iters,
                                warmup=args.warmup,
                                device=device,
                            )
                        except torch.OutOfMemoryError as err:
                            row = {
                                "model": name,
                                "tp": tp,
                                "cp": cp,
                                "kind": kind,
                                "recompute": recompute,
                                "error": f"out of memory: {err}"[:300],
                            }
                        gc.collect()  # the shard's model and activations die with measure_shard's frame
                        if cuda:
                            torch.cuda.empty_cache()
                        result["rows"].append(row)
                        result["elapsed_s"] = time.perf_counter() - started
                        write_json_atomic(out, result)  # after every row: a run cut short keeps its numbers
                        print(
                            f"[{time.perf_counter() - started:6.0f} s] {format_table([row]).splitlines()[-1]}",
                            flush=True,
                        )
    finally:
        destroy()
    print(f"\n{device_name}, {dtype}, per layer, compute only (no communication, no sequence parallelism)")
    print(format_table(result["rows"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
