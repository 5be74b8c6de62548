"""Benchmark LongGen's sparse attention backends against dense causal attention (torch SDPA, cuDNN).

(A self-contained benchmark CLI, hence its length: options, timing, the table and the JSON in one file.)

Legend: B = batch (1), N = query heads, G = KV heads, S = sequence length, H = head dim.

For each (head config, sequence length) the script times, in one process and on one GPU:
- `dense_causal`: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` restricted to the
  cuDNN backend (falls back to the flash backend, with a note in the row, where cuDNN refuses the shape);
- every available sparse backend (`cudnn_bsa`, `cudnn_bsa_fwd`, `triton`, `flex`) on `sink_window` and `block_strided`
  with the paper's defaults (64-token blocks; 1 sink + 32 window blocks; stride 64 blocks, 1 local block).

FLOP convention (FlashAttention's): forward = 4 * pairs * H * N (two matmuls of 2 FLOPs per multiply-add),
backward = 2.5 x forward (five matmuls), so fwd+bwd = 3.5 x forward. `pairs` counts the attended
(query, key) pairs of one head (`masks.attended_pairs`): S(S+1)/2 for dense causal. TFLOP/s are therefore
"useful" rates and are comparable between dense and sparse rows; `ratio_to_dense` divides a row's fwd+bwd
rate by the dense row's rate at the same shape, `speedup_vs_dense` divides the times.

Memory: `peak_mem_bytes` is the peak allocated during one fwd+bwd above what was allocated before it
(q, k, v and dO), `extra_mem_bytes` subtracts the unavoidable outputs (out, lse, dq, dk, dv), and
`extra_mem_frac_qkvo` divides that by the bytes of q, k, v and out.

Writes `benchmarks/results/attention_<device>.json` (or --out) with device, versions, date and `rows`,
and prints a table. Needs CUDA.

    python tools/bench_attention.py --seq-lens 16384 32768 65536 131072
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from megatron_longgen.attention.kernels import available_kernels
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern, attended_pairs

HEAD_CONFIGS = {"mha": (32, 32, 128), "gqa": (64, 8, 128)}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _time_ms(fn, *, budget_s: float, min_reps: int = 2, max_reps: int = 20) -> float:
    """Median time of `fn` in ms over reps sized to `budget_s` (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = int(max(min_reps, min(max_reps, budget_s * 1000 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _dense_fn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = k.shape[1] != q.shape[1]
    notes = []

    def run(backend, q, k, v, expand):
        if expand:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=gqa and not expand
            )

    for backend, expand in ((SDPBackend.CUDNN_ATTENTION, False), (SDPBackend.CUDNN_ATTENTION, True),
                            (SDPBackend.FLASH_ATTENTION, False), (SDPBackend.FLASH_ATTENTION, True)):  # fmt: skip
        if expand and not gqa:
            continue
        try:
            out = run(backend, q, k, v, expand)
            out.sum().backward()
            q.grad = k.grad = v.grad = None
            notes.append(f"{backend.name.lower()}{' kv-expanded' if expand else ''}")
            return (lambda q, k, v, b=backend, e=expand: (run(b, q, k, v, e), None)), notes
        except RuntimeError as exc:
            notes.append(f"{backend.name.lower()} refused: {str(exc).splitlines()[0][:120]}")
    raise RuntimeError("no dense SDPA backend ran: " + "; ".join(notes))


def bench_one(fn, *, B, N, G, S, H, dtype, budget_s):
    """fwd ms, fwd+bwd ms, peak and extra memory of `fn(q, k, v) -> (out, lse)`."""
    dev = torch.device("cuda")
    q = torch.randn(B, N, S, H, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, G, S, H, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, G, S, H, device=dev, dtype=dtype, requires_grad=True)
    d_out = torch.randn(B, N, S, H, device=dev, dtype=dtype)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        out, _ = fn(q, k, v)
        out.backward(d_out)

    fwd_ms = _time_ms(fwd, budget_s=budget_s)
    fwdbwd_ms = _time_ms(fwd_bwd, budget_s=budget_s)
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    esize = torch.tensor([], dtype=dtype).element_size()
    outputs = (2 * B * N * S * H + 2 * B * G * S * H) * esize + B * N * S * 4  # out, dq, dk, dv, lse
    qkvo = (2 * B * N * S * H + 2 * B * G * S * H) * esize
    q = k = v = d_out = None  # drop the tensors (and the closures' references) before empty_cache
    torch.cuda.empty_cache()
    return fwd_ms, fwdbwd_ms, peak, peak - outputs, qkvo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--heads", nargs="+", default=["mha", "gqa"], choices=sorted(HEAD_CONFIGS))
    parser.add_argument(
        "--backends", nargs="+", default=None, help="sparse backends (default: all available)"
    )
    parser.add_argument("--patterns", nargs="+", default=["sink_window", "block_strided"])
    parser.add_argument(
        "--skip", nargs="*", default=[], help="backend:seq_len pairs to skip, e.g. flex:16384"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--budget-s", type=float, default=0.6, help="timing budget per measurement")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/attention_<device>.json)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="tile/launch sweep of the Triton and Flex kernels"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    # Every (sequence length, grad mode) is a new FlexAttention graph; the default limit of 8 recompiles
    # would silently send later shapes to the eager S^2 path.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    if args.sweep:
        return sweep(args)
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    registry = available_kernels()
    backends = args.backends or [
        n
        for n in ("cudnn_bsa", "cudnn_bsa_fwd", "triton", "flex")
        if registry[n].is_available(device=dev, dtype=dtype)
    ]
    patterns = {"sink_window": SinkWindowPattern(), "block_strided": BlockStridedPattern()}
    kernels = {name: registry[name]() for name in backends}
    device_name = torch.cuda.get_device_name()
    rows = []
    jobs = [(h, S) for h in args.heads for S in args.seq_lens]
    for i, (head_cfg, S) in enumerate(jobs):
        N, G, H = HEAD_CONFIGS[head_cfg]
        shape = {"B": 1, "N": N, "G": G, "S": S, "H": H}
        _log(f"[{i + 1}/{len(jobs)}] {head_cfg} N={N} G={G} H={H} S={S}: dense_causal (sdpa)")
        qs = torch.randn(1, N, 256, H, device=dev, dtype=dtype, requires_grad=True)
        ks = torch.randn(1, G, 256, H, device=dev, dtype=dtype, requires_grad=True)
        dense, notes = _dense_fn(qs, ks, ks.detach().clone().requires_grad_())
        dense_budget = args.budget_s * (3 if S <= 65536 else 1)
        fwd_ms, fb_ms, peak, extra, qkvo = bench_one(dense, **shape, dtype=dtype, budget_s=dense_budget)
        pairs = attended_pairs(None, S)
        fwd_flops = 4 * pairs * H * N
        dense_tf = 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12
        dense_fb_ms = fb_ms
        rows.append({
            "backend": "sdpa_" + notes[-1].split()[0], "pattern": "dense_causal", "seq_len": S, "num_heads": N, "num_kv_heads": G,
            "head_dim": H, "fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "tflops_fwd": fwd_flops / (fwd_ms * 1e-3) / 1e12,
            "tflops_fwdbwd": dense_tf, "ratio_to_dense": 1.0, "speedup_vs_dense": 1.0, "peak_mem_bytes": peak,
            "extra_mem_bytes": extra, "extra_mem_frac_qkvo": extra / qkvo, "attended_pairs": pairs, "notes": "; ".join(notes),
        })  # fmt: skip
        _log(f"    dense: fwd {fwd_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms, {dense_tf:.0f} TF/s")
        for pname in args.patterns:
            pattern = patterns[pname]
            pairs = attended_pairs(pattern, S)
            fwd_flops = 4 * pairs * H * N
            for bname, kern in kernels.items():
                if f"{bname}:{S}" in args.skip:
                    continue
                _log(f"    {bname} {pname} ...")
                fn = lambda q, k, v, kern=kern, pattern=pattern: kern(q, k, v, pattern=pattern)
                try:
                    t0 = time.time()
                    fwd_ms, fb_ms, peak, extra, qkvo = bench_one(
                        fn, **shape, dtype=dtype, budget_s=args.budget_s
                    )
                except Exception as exc:  # noqa: BLE001  (a backend failing to compile must not lose the other rows)
                    _log(
                        f"    {bname} {pname} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    )
                    rows.append({"backend": bname, "pattern": pname, "seq_len": S, "num_heads": N, "num_kv_heads": G,
                                     "head_dim": H, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})  # fmt: skip
                    continue
                tf = 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12
                rows.append({
                    "backend": bname, "pattern": pname, "seq_len": S, "num_heads": N, "num_kv_heads": G, "head_dim": H,
                    "fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "tflops_fwd": fwd_flops / (fwd_ms * 1e-3) / 1e12,
                    "tflops_fwdbwd": tf, "ratio_to_dense": tf / dense_tf, "speedup_vs_dense": dense_fb_ms / fb_ms,
                    "peak_mem_bytes": peak, "extra_mem_bytes": extra, "extra_mem_frac_qkvo": extra / qkvo,
                    "attended_pairs": pairs, "wall_s": time.time() - t0,
                })  # fmt: skip
                _log(f"    {bname} {pname}: fwd {fwd_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms, {tf:.0f} TF/s "
                     f"({tf / dense_tf:.2f}x dense rate, {dense_fb_ms / fb_ms:.1f}x faster), "
                     f"extra mem {extra / qkvo:.2%} of QKVO")  # fmt: skip
    print_table(rows)
    slug = device_name.lower().replace("nvidia", "").strip().replace(" ", "_")
    out = args.out or os.path.join("benchmarks", "results", f"attention_{slug}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    import triton

    try:
        import cudnn as cudnn_frontend

        frontend = getattr(cudnn_frontend, "__version__", "installed")
    except ImportError:
        frontend = None
    meta = {
        "device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__, "cudnn_frontend": frontend, "python": platform.python_version(), "dtype": args.dtype, "batch": 1,
        "flop_convention": "fwd = 4*pairs*head_dim*num_heads; fwd+bwd = 3.5 x fwd (bwd = 2.5 x fwd)",
        "rows": rows,
    }  # fmt: skip
    with open(out, "w") as f:
        json.dump(meta, f, indent=1)
    _log(f"wrote {out}")
    return 0


def _profile(kern, pattern, *, N, G, S, H, dtype) -> None:
    """Print the CUDA time of each kernel in a few fwd+bwd calls (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    q = torch.randn(1, N, S, H, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, G, S, H, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, G, S, H, device=dev, dtype=dtype, requires_grad=True)
    for _ in range(2):
        kern(q, k, v, pattern=pattern)[0].sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            kern(q, k, v, pattern=pattern)[0].sum().backward()
        torch.cuda.synchronize()
    _log(f"profile {kern.name} {pattern.name} S={S} N={N} G={G} (3 fwd+bwd calls):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


def _remainder_variants():
    """cudnn_bsa's Triton remainder launches, one kernel varied at a time around REMAINDER_CONFIG."""
    from megatron_longgen.attention.kernels.cudnn_bsa import REMAINDER_CONFIG as base
    from megatron_longgen.attention.kernels.triton_block_sparse import LaunchConfig as L
    from megatron_longgen.attention.kernels.triton_block_sparse import TritonConfig

    out = [("base", base.fwd, base)]
    out += [("fwd", c, TritonConfig(fwd=c, dq=base.dq, dkdv=base.dkdv))
            for c in (L(64, 64, 4, 3), L(64, 64, 4, 2), L(64, 64, 8, 2))]  # fmt: skip
    out += [("dq", c, TritonConfig(fwd=base.fwd, dq=c, dkdv=base.dkdv))
            for c in (L(64, 64, 4, 2), L(64, 64, 4, 3), L(32, 64, 4, 2))]  # fmt: skip
    out += [("dkdv", c, TritonConfig(fwd=base.fwd, dq=base.dq, dkdv=c))
            for c in (L(64, 64, 4, 3), L(16, 64, 4, 3), L(64, 128, 8, 2))]  # fmt: skip
    return out


def sweep(args) -> int:
    """Time Triton launch configs (one kernel varied at a time), Flex tile options and (with `--backends
    cudnn_bsa`) the launches of cudnn_bsa's Triton remainder; print and save."""
    from megatron_longgen.attention.kernels.cudnn_bsa import CUDNN_PATTERNS, CudnnBlockSparseKernel
    from megatron_longgen.attention.kernels.flex import FlexSparseKernel
    from megatron_longgen.attention.kernels.triton_block_sparse import (
        DEFAULT_CONFIGS,
        LaunchConfig,
        TritonBlockSparseKernel,
        TritonConfig,
    )

    dtype = getattr(torch, args.dtype)
    L = LaunchConfig
    fwd_cands = [L(128, 64, 8, 3), L(64, 64, 4, 3), L(64, 64, 4, 4), L(128, 64, 8, 2)]
    dq_cands = [L(128, 64, 8, 2), L(128, 64, 8, 1), L(64, 64, 4, 2)]
    kv_cands = [L(32, 64, 4, 4), L(32, 64, 4, 5), L(32, 64, 4, 3), L(32, 64, 8, 4), L(64, 64, 4, 4), L(32, 128, 8, 4),
                L(64, 128, 8, 3), L(128, 128, 8, 2), L(16, 64, 4, 4), L(16, 64, 4, 6)]  # fmt: skip
    flex_cands = {
        "flex_128x128": {"block_m": 128, "block_n": 128},
        "flex_128x64_a": {"block_m": 128, "block_n": 64, "kernel_options": {
            "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}},
        "flex_128x64_b": {"block_m": 128, "block_n": 64, "kernel_options": {
            "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}},
    }  # fmt: skip
    patterns = {"sink_window": SinkWindowPattern(), "block_strided": BlockStridedPattern()}
    results = []
    for head_cfg in args.heads:
        N, G, H = HEAD_CONFIGS[head_cfg]
        for S in args.seq_lens:
            for pname in args.patterns:
                pattern = patterns[pname]
                fwd_flops = 4 * attended_pairs(pattern, S) * H * N
                base = DEFAULT_CONFIGS[pname]
                variants = [("fwd", c, TritonConfig(fwd=c, dq=base.dq, dkdv=base.dkdv)) for c in fwd_cands]
                variants += [("dq", c, TritonConfig(fwd=base.fwd, dq=c, dkdv=base.dkdv)) for c in dq_cands]
                variants += [("dkdv", c, TritonConfig(fwd=base.fwd, dq=base.dq, dkdv=c)) for c in kv_cands]
                kernels = []
                if "triton" in (args.backends or ["triton"]):
                    _profile(TritonBlockSparseKernel(), pattern, N=N, G=G, S=S, H=H, dtype=dtype)
                    kernels += [(f"triton {what} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}",
                                 TritonBlockSparseKernel(config=cfg)) for what, c, cfg in variants]  # fmt: skip
                if "flex" in (args.backends or ["flex"]):
                    kernels += [(name, FlexSparseKernel(**kw)) for name, kw in flex_cands.items()]
                if "cudnn_bsa" in (args.backends or []) and pname in CUDNN_PATTERNS:
                    kernels += [(f"cudnn_bsa remainder {what} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}",
                                 CudnnBlockSparseKernel(remainder_config=cfg)) for what, c, cfg in _remainder_variants()]  # fmt: skip
                for name, kern in kernels:
                    fn = lambda q, k, v, kern=kern, pattern=pattern: kern(q, k, v, pattern=pattern)
                    try:
                        fwd_ms, fb_ms, _, extra, qkvo = bench_one(
                            fn, B=1, N=N, G=G, S=S, H=H, dtype=dtype, budget_s=args.budget_s
                        )
                    except Exception as exc:  # noqa: BLE001  (configs that fail to compile are reported, not fatal)
                        _log(f"{head_cfg} S={S} {pname} {name}: FAILED {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''}")  # fmt: skip
                        results.append(
                            {
                                "head": head_cfg,
                                "seq_len": S,
                                "pattern": pname,
                                "variant": name,
                                "error": str(exc)[:300],
                            }
                        )
                        continue
                    row = {"head": head_cfg, "seq_len": S, "pattern": pname, "variant": name, "fwd_ms": fwd_ms,
                               "bwd_ms": fb_ms - fwd_ms, "fwdbwd_ms": fb_ms,
                               "tflops_fwd": fwd_flops / fwd_ms / 1e9, "tflops_fwdbwd": 3.5 * fwd_flops / fb_ms / 1e9,
                               "extra_mem_frac_qkvo": extra / qkvo}  # fmt: skip
                    results.append(row)
                    _log(f"{head_cfg} S={S} {pname} {name}: fwd {fwd_ms:.2f} ms ({row['tflops_fwd']:.0f} TF/s) "
                         f"bwd {fb_ms - fwd_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms ({row['tflops_fwdbwd']:.0f} TF/s)")  # fmt: skip
    out = args.out or "sweep_attention.json"
    with open(out, "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, f, indent=1
        )
    return 0


def print_table(rows) -> None:
    cols = ["backend", "pattern", "seq_len", "num_heads", "num_kv_heads", "fwd_ms", "fwdbwd_ms", "tflops_fwdbwd",
            "ratio_to_dense", "speedup_vs_dense", "extra_mem_frac_qkvo"]  # fmt: skip
    head = [
        "backend",
        "pattern",
        "S",
        "N",
        "G",
        "fwd ms",
        "f+b ms",
        "f+b TF/s",
        "x dense rate",
        "speedup",
        "extra mem",
    ]
    fmt = "{:<14} {:<14} {:>7} {:>3} {:>3} {:>9} {:>9} {:>9} {:>12} {:>8} {:>9}"
    print(fmt.format(*head))
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<14} {r['pattern']:<14} {r['seq_len']:>7} {r['num_heads']:>3} {r['num_kv_heads']:>3}"
                  f"  ERROR {r['error'][:60]}")  # fmt: skip
            continue
        vals = []
        for c in cols:
            x = r[c]
            if c in ("fwd_ms", "fwdbwd_ms"):
                x = f"{x:.2f}"
            elif c == "tflops_fwdbwd":
                x = f"{x:.0f}"
            elif c in ("ratio_to_dense",):
                x = f"{x:.2f}"
            elif c == "speedup_vs_dense":
                x = f"{x:.1f}"
            elif c == "extra_mem_frac_qkvo":
                x = f"{x:.2%}"
            vals.append(x)
        print(fmt.format(*vals))


if __name__ == "__main__":
    sys.exit(main())
