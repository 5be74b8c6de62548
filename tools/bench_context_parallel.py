"""Benchmark context parallelism: ring attention (full layers) and the KV-reduced exchange (sparse layers).

Run on R GPUs of one host (any R; the whole world is one CP group)::

    torchrun --nproc-per-node 2 tools/bench_context_parallel.py --out benchmarks/results/context_parallel_h200.json

What it does, in order (Legend: S = global sequence, R = CP size, B = batch, N / G = query / KV heads,
H = head dim):
1. checks, on every rank at a small size, each fast ring step kernel (cuDNN, flash) against the fp32 math
   kernel (forward out and lse, backward dQ/dK/dV given the merged out and lse), then ring attention and
   the sparse exchange over the group against the dense oracle, in bf16 (tolerance: 3x the error of a
   naive bf16 run, STYLE rule 5); only kernels that pass are timed;
2. CP=1: each rank alone (a one-rank group) times full causal attention fwd+bwd at S and each sparse
   variant, through the same code path with no communication;
3. CP=R: the same on each rank's zig-zag shard over the whole group; the time is the slowest rank's;
4. writes a JSON with times, ratios (CP=R / CP=1; ideal 1/R), and bytes moved per layer and rank
   (forward; the backward moves the same K/V again plus dK/dV in fp32 for ring attention, and the same
   amounts in bf16 for the sparse exchange), next to what an all-gather of K/V would receive.

Only torch and `megatron_longgen.context_parallel` / `attention` modules are imported (no Megatron-Core).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern, dense_causal_mask
from megatron_longgen.attention.reference import reference_attention
from megatron_longgen.context_parallel.exchange_plan import plan_sparse_exchange
from megatron_longgen.context_parallel.ring_attention import ring_attention
from megatron_longgen.context_parallel.sharding import shard_sequence
from megatron_longgen.context_parallel.sparse_exchange import sparse_cp_attention
from megatron_longgen.context_parallel.step_kernels import STEP_KERNELS, MathStepKernel

_DEVICE = [torch.device("cpu")]


def _err(a, b):
    return float((a.float() - b.float()).abs().max())


def check_step_kernel(name: str, device) -> dict:
    """A fast step kernel (bf16) against the fp32 math kernel on the same bf16-rounded inputs: causal
    square and non-causal rectangular steps; errors relative to the largest reference magnitude."""
    torch.manual_seed(0)
    math_k, fast = MathStepKernel(), STEP_KERNELS[name]()
    report = {}
    for causal, (s, t) in ((True, (512, 512)), (False, (256, 512))):
        q, k, v = (torch.randn(1, 4, n, 64, device=device, dtype=torch.bfloat16) for n in (s, t, t))
        do = torch.randn_like(q)
        o_ref, l_ref = math_k.forward(q.float(), k.float(), v.float(), causal=causal, scale=0.125)
        o, l = fast.forward(q, k, v, causal=causal, scale=0.125)
        g_ref = math_k.backward(
            do.float(), q.float(), k.float(), v.float(), o_ref, l_ref, causal=causal, scale=0.125
        )
        g = fast.backward(do, q, k, v, o, l, causal=causal, scale=0.125)
        rel = {"out": _err(o, o_ref) / float(o_ref.abs().max()), "lse": _err(l, l_ref)}
        rel.update({f"d{x}": _err(a, b) / float(b.abs().max()) for x, a, b in zip("qkv", g, g_ref)})
        report["causal" if causal else "rect"] = rel
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.0039): allow a few roundings.
    ok = all(all(err < 2e-2 for err in r.values()) for r in report.values())
    return {"ok": ok, "errors": report}


def check_cp(group, kernel, sparse_kernels, device) -> dict:
    """Ring attention and both sparse variants (each sparse kernel) over `group` vs the oracle (bf16 vs
    fp32 gold)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(1)
    S, n, g, h = 1024 * world, 8, 2, 64
    q, k, v, do = (torch.randn(1, x, S, h, device=device) for x in (n, g, g, n))
    out = {}
    patterns = {
        "sink_window": SinkWindowPattern(block_size=64, num_sink_blocks=1, num_window_blocks=4),
        "block_strided": BlockStridedPattern(block_size=64, stride_blocks=3, num_local_blocks=2),
    }
    cases = {"full": (None, None)}
    cases.update({f"{p}_{sk}": (patterns[p], sk) for p in patterns for sk in sparse_kernels})
    for name, (pattern, sparse_kernel) in cases.items():
        mask = (
            dense_causal_mask(S, device=device) if pattern is None else pattern.dense_mask(S, device=device)
        )
        gold = [t.clone().requires_grad_() for t in (q, k, v)]
        o_gold, _ = reference_attention(*gold, mask)
        o_gold.backward(do)
        naive = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        o_naive, _ = reference_attention(*naive, mask)
        o_naive.backward(do.bfloat16())
        loc = [
            shard_sequence(t.bfloat16(), cp_rank=rank, cp_size=world, seq_dim=2).requires_grad_()
            for t in (q, k, v)
        ]
        if pattern is None:
            o, _ = ring_attention(*loc, cp_group=group, kernel=kernel)
        else:
            o, _ = sparse_cp_attention(*loc, pattern=pattern, cp_group=group, kernel=sparse_kernel)
        o.backward(shard_sequence(do.bfloat16(), cp_rank=rank, cp_size=world, seq_dim=2))

        def sh(t):
            return shard_sequence(t, cp_rank=rank, cp_size=world, seq_dim=2)

        errs = {"out": (_err(o, sh(o_gold)), _err(sh(o_naive), sh(o_gold)))}
        for x, a, gl, nv in zip("qkv", loc, gold, naive):
            errs[f"d{x}"] = (_err(a.grad, sh(gl.grad)), _err(sh(nv.grad), sh(gl.grad)))
        ok = all(e <= 3 * max(base, 1e-2) for e, base in errs.values())
        out[name] = {"ok": ok, "errors": errs}
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, *, warmup: int, iters: int, group) -> float:
    """Median wall time (ms) of fn() over iters, slowest rank of `group`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor([statistics.median(times)], device=_DEVICE[0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def _fwd_bwd(attn, q, k, v, do):
    def run():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        o, _ = attn(qq, kk, vv)
        o.backward(do)

    return run


def bench_layer(kind, pattern, *, group, seq_len, args, kernel, device) -> float:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = seq_len // world
    dt = torch.bfloat16
    torch.manual_seed(2 + rank)
    q = torch.randn(args.batch, args.heads, local, args.head_dim, device=device, dtype=dt)
    k = torch.randn(args.batch, args.kv_heads, local, args.head_dim, device=device, dtype=dt)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    if kind == "full":

        def attn(a, b, c):
            return ring_attention(a, b, c, cp_group=group, kernel=kernel)

        iters = args.iters
    else:

        def attn(a, b, c):
            return sparse_cp_attention(a, b, c, pattern=pattern, cp_group=group, kernel=kernel)

        iters = args.sparse_iters
    ms = _time(_fwd_bwd(attn, q, k, v, do), warmup=1, iters=iters, group=group)
    del q, k, v, do
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sparse-iters", type=int, default=2)
    p.add_argument("--step-kernels", default="cudnn,flash", help="fast ring step kernels to check and time")
    p.add_argument("--sparse-kernels", default="flex,torch", help="sparse CP kernels to check and time")
    p.add_argument("--skip-sparse", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:  # a CPU smoke run of the script itself (gloo, math kernel, tiny sizes)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    _DEVICE[0] = device
    rank, world = dist.get_rank(), dist.get_world_size()
    cp_group = dist.group.WORLD
    solo = [dist.new_group([r]) for r in range(world)][rank]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": world,
        "torch": torch.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "shape": {
            "seq_len": args.seq_len,
            "batch": args.batch,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": "bf16",
        },
    }

    checks = {}
    for name in args.step_kernels.split(","):
        try:
            checks[name] = check_step_kernel(name, device)
        except RuntimeError as e:  # an op this torch build lacks: recorded, not timed
            checks[name] = {"ok": False, "exception": str(e)[:500]}
    flags = torch.tensor([int(c["ok"]) for c in checks.values()], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    valid = [n for n, f in zip(checks, flags.tolist()) if f]
    result["step_kernel_checks"] = checks
    if rank == 0:
        print("step kernel checks:", {n: c["ok"] for n, c in checks.items()}, flush=True)
    if not valid:
        raise SystemExit("no fast ring step kernel passed its check")
    sparse_kernels = args.sparse_kernels.split(",") if device.type == "cuda" else ["torch"]
    result["cp_checks"] = check_cp(cp_group, valid[0], sparse_kernels, device)
    if rank == 0:
        print("cp checks:", {n: c["ok"] for n, c in result["cp_checks"].items()}, flush=True)

    seq = args.seq_len
    full = {}
    for name in valid:
        t1 = bench_layer("full", None, group=solo, seq_len=seq, args=args, kernel=name, device=device)
        dist.barrier()
        tr = bench_layer("full", None, group=cp_group, seq_len=seq, args=args, kernel=name, device=device)
        full[name] = {"cp1_ms": t1, f"cp{world}_ms": tr, "ratio": tr / t1}
        if rank == 0:
            print(f"full {name}: cp1 {t1:.1f} ms, cp{world} {tr:.1f} ms, ratio {tr / t1:.3f}", flush=True)
    elem = 2
    kv_shard = 2 * args.batch * args.kv_heads * (seq // world) * args.head_dim * elem
    result["full"] = {
        "timings": full,
        "bytes_per_rank_fwd": (world - 1) * kv_shard,
        "bytes_per_rank_bwd": (world - 1) * kv_shard + world * kv_shard * 2,  # K/V again + fp32 dK/dV
        "allgather_kv_bytes_per_rank": (world - 1) * kv_shard,
    }

    sparse = {}
    if not args.skip_sparse:
        patterns = {"sink_window": SinkWindowPattern(), "block_strided": BlockStridedPattern()}
        for name, pattern in patterns.items():
            plans = [
                plan_sparse_exchange(pattern, cp_rank=r, cp_size=world, seq_len=seq) for r in range(world)
            ]
            moved = [
                pl.forward_bytes(
                    batch=args.batch, kv_heads=args.kv_heads, head_dim=args.head_dim, element_size=elem
                )
                for pl in plans
            ]
            max_recv = max(m["received"] for m in moved)
            entry = {
                "pattern": repr(pattern),
                "bytes_received_fwd_per_rank": [m["received"] for m in moved],
                "bytes_sent_fwd_per_rank": [m["sent"] for m in moved],
                "blocks_fetched_per_rank": [pl.num_fetched_blocks for pl in plans],
                "allgather_kv_bytes_per_rank": (world - 1) * kv_shard,
                "bytes_fraction_of_allgather": max_recv / ((world - 1) * kv_shard),
                "timings": {},
            }
            for sk in sparse_kernels:
                if not all(result["cp_checks"][f"{n}_{sk}"]["ok"] for n in patterns):
                    continue
                t1 = bench_layer(
                    "sparse", pattern, group=solo, seq_len=seq, args=args, kernel=sk, device=device
                )
                dist.barrier()
                tr = bench_layer(
                    "sparse", pattern, group=cp_group, seq_len=seq, args=args, kernel=sk, device=device
                )
                entry["timings"][sk] = {"cp1_ms": t1, f"cp{world}_ms": tr, "ratio": tr / t1}
                if rank == 0:
                    print(
                        f"sparse {name} [{sk}]: cp1 {t1:.1f} ms, cp{world} {tr:.1f} ms, ratio {tr / t1:.3f}, "
                        f"bytes {max_recv} = {entry['bytes_fraction_of_allgather']:.4f} of all-gather",
                        flush=True,
                    )
            sparse[name] = entry
    result["sparse"] = sparse
    if rank == 0:
        text = json.dumps(result, indent=2, default=str)
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
