"""Inference benchmark on one GPU: a Llama-2-7B-shaped LongGen model vs the same weights all-full.

    python tools/bench_inference.py                      # 32K, 64K, 128K; ~4-5 minutes on an H200
    python tools/bench_inference.py --quick              # 4K and 8K, 32 decode tokens: a smoke test
    python tools/bench_inference.py --lengths 131072 --profile

The model: 32 layers, hidden 4096, 32 heads (MHA), SwiGLU 11008, vocabulary 32000, random bf16 weights (no
download); LongGen = the middle 11 layers full, the other 21 sink_window (64-token blocks, 1 sink block,
32 window blocks); the baseline is the same weights with every layer full (`set_kv_policy("full")`), in
the same process. Both run `LongGenLlamaForCausalLM` as users do: prefill of one sequence (S layers
through the fastest sparse kernel, F layers through SDPA with `--sdpa-prefill` priority), then greedy
decoding of `--decode-tokens` tokens over the reduced (or full) cache, preallocated for prompt + new
tokens, first eagerly, then replaying a CUDA graph per step (`inference/cuda_graphs.py`; full layers then
use the split-KV Triton kernel). Per (model, length): KV-cache bytes (allocated), prefill seconds, decode
ms/token (the faster mode, both recorded; after `--warmup-decode` untimed steps), peak memory. Writes benchmarks/results/inference_<device>.json (device,
date, versions, `rows`, ratios and the 128K targets) after every row and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

TARGETS_128K = {"kv_ratio_max": 0.38, "prefill_speedup_min": 1.7, "decode_speedup_min": 1.8}
SPARSE = {"variant": "sink_window", "block_size": 64, "num_sink_blocks": 1, "num_window_blocks": 32,
          "stride_blocks": 64, "num_local_blocks": 1, "backend": "auto"}  # fmt: skip


def build_model(*, num_layers: int, max_len: int, sparse_backend: str):
    import torch

    from megatron_longgen.checkpoint.hf_model import LongGenLlamaConfig, LongGenLlamaForCausalLM
    from megatron_longgen.models.layer_pattern import default_layer_pattern

    config = LongGenLlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max_len, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        longgen={"layer_pattern": default_layer_pattern(num_layers), **SPARSE},
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the 6.7B parameters directly in bf16 on the GPU
    try:
        with torch.device("cuda"):
            model = LongGenLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.sparse_backend = sparse_backend
    return model.eval()


def _backends(spec: str):
    from torch.nn.attention import SDPBackend

    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    chosen = [names[n] for n in spec.split(",") if n]
    return chosen + [b for b in names.values() if b not in chosen]  # unsupported inputs fall through


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_decode(step, token, *, warmup: int, steps: int):
    """(ms per token, last token) of `steps` greedy steps after `warmup` untimed ones."""
    for _ in range(warmup):
        token = step(token).argmax(-1, keepdim=True)
    _sync(token.device)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token).argmax(-1, keepdim=True)
    _sync(token.device)
    return 1000 * (time.perf_counter() - start) / steps, token


def run_one(model, *, kind: str, seq_len: int, decode_tokens: int, warmup_decode: int, prefill_sdpa: str,
            decode_sdpa: str, graphs: bool = True, profile: bool = False) -> dict:  # fmt: skip
    """Prefill `seq_len` random tokens, then greedy-decode eagerly and from a CUDA graph; one JSON row."""
    import torch
    from torch.nn.attention import sdpa_kernel

    from megatron_longgen.inference.cuda_graphs import CudaGraphDecoder

    model.set_kv_policy("model" if kind == "longgen" else "full")
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator(device=device).manual_seed(seq_len)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device, generator=generator)
    cache = model.new_cache(max_cache_len=seq_len + 2 * (warmup_decode + decode_tokens) + 1)
    row = {"model": kind, "seq_len": seq_len, "layer_kinds": model.layer_kinds()}
    with torch.no_grad():
        with sdpa_kernel(_backends(prefill_sdpa), set_priority=True):
            _sync(device)
            start = time.perf_counter()
            out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            _sync(device)
            row["prefill_s"] = time.perf_counter() - start
        row["prefill_tokens_per_s"] = seq_len / row["prefill_s"]
        row["kv_cache_bytes"] = cache.nbytes()
        row["kv_cache_bytes_by_kind"] = cache.nbytes_by_kind()
        token = out.logits[:, -1:].argmax(-1)
        del out
        with sdpa_kernel(_backends(decode_sdpa), set_priority=True):

            def eager(tok):
                return model(tok, cache=cache, logits_to_keep=1).logits[:, -1]

            row["decode_ms_per_token_eager"], token = _time_decode(eager, token, warmup=warmup_decode,
                                                                   steps=decode_tokens)  # fmt: skip
            row["decode_ms_per_token"] = row["decode_ms_per_token_eager"]
            row["decode_mode"] = "eager"
            if graphs and on_gpu:
                try:
                    decoder = CudaGraphDecoder(model, cache)
                    row["decode_ms_per_token_graph"], token = _time_decode(decoder, token, warmup=warmup_decode,
                                                                           steps=decode_tokens)  # fmt: skip
                    if row["decode_ms_per_token_graph"] < row["decode_ms_per_token"]:
                        row["decode_ms_per_token"] = row["decode_ms_per_token_graph"]
                        row["decode_mode"] = "cuda_graph"
                except Exception as exc:  # noqa: BLE001 - any failure of the optional graph path: keep the eager row
                    row["decode_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if profile:
                _profile_decode(eager, token, label=f"{kind} {seq_len}, eager")
    row["decode_tokens"] = decode_tokens
    row["context_after_decode"] = cache.lengths[0]
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if on_gpu else None
    return row  # the cache is freed by the next run_one's gc.collect() / empty_cache()


def _profile_decode(step, token, *, label: str) -> None:
    """Print where decode steps spend GPU and CPU time (for a missed target: measured, not guessed)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            token = step(token).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    print(f"\n--- decode profile ({label}, 3 steps) ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def comparisons(rows: list[dict]) -> list[dict]:
    out = []
    for seq in sorted({r["seq_len"] for r in rows}):
        pair = {r["model"]: r for r in rows if r["seq_len"] == seq and "error" not in r}
        if {"longgen", "full"} <= set(pair):
            lg, full = pair["longgen"], pair["full"]
            out.append({
                "seq_len": seq,
                "kv_ratio": lg["kv_cache_bytes"] / full["kv_cache_bytes"],
                "prefill_speedup": full["prefill_s"] / lg["prefill_s"],
                "decode_speedup": full["decode_ms_per_token"] / lg["decode_ms_per_token"],
                "peak_mem_ratio": lg["peak_mem_bytes"] / full["peak_mem_bytes"] if full["peak_mem_bytes"] else None,
            })  # fmt: skip
    return out


def targets(comparison: list[dict]) -> dict | None:
    at = next((c for c in comparison if c["seq_len"] == 131072), None)
    if at is None:
        return None
    return {
        **TARGETS_128K,
        "kv_ratio_met": at["kv_ratio"] <= TARGETS_128K["kv_ratio_max"],
        "prefill_speedup_met": at["prefill_speedup"] >= TARGETS_128K["prefill_speedup_min"],
        "decode_speedup_met": at["decode_speedup"] >= TARGETS_128K["decode_speedup_min"],
    }


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "transformers": transformers.__version__}  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def print_table(rows: list[dict], comparison: list[dict]) -> None:
    print(f"\n{'model':<9}{'seq':>8}{'KV GiB':>9}{'prefill s':>11}{'decode ms/tok':>15}{'(eager)':>9}"
          f"{'peak GiB':>10}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<9}{r['seq_len']:>8}  {r['error'][:70]}")
            continue
        print(f"{r['model']:<9}{r['seq_len']:>8}{r['kv_cache_bytes'] / 2**30:>9.2f}{r['prefill_s']:>11.2f}"
              f"{r['decode_ms_per_token']:>15.2f}{r['decode_ms_per_token_eager']:>9.2f}"
              f"{r['peak_mem_bytes'] / 2**30:>10.1f}")  # fmt: skip
    print(f"\n{'seq':>8}{'KV longgen/full':>17}{'prefill speedup':>17}{'decode speedup':>16}")
    for c in comparison:
        print(
            f"{c['seq_len']:>8}{c['kv_ratio']:>17.3f}{c['prefill_speedup']:>17.2f}{c['decode_speedup']:>16.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 65536, 131072]
    )
    parser.add_argument("--quick", action="store_true", help="4K and 8K, 32 decode tokens (smoke test)")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--warmup-decode", type=int, default=8, help="untimed decode steps before timing")
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for debugging (pattern scales)")
    parser.add_argument(
        "--sparse-backend", default="auto", help="sparse prefill kernel (auto: cudnn_bsa/triton)"
    )
    parser.add_argument("--sdpa-prefill", default="cudnn,flash", help="SDPA backend priority for prefill")
    parser.add_argument(
        "--sdpa-decode", default="flash,cudnn,efficient", help="SDPA backend priority for decode"
    )
    parser.add_argument("--profile", action="store_true", help="print a profile of decode steps per row")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode only (no CUDA graph timing)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/inference_<device>.json)"
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_inference: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.lengths, args.decode_tokens = [4096, 8192], 32
    device = torch.cuda.get_device_name()
    slug = device.split()[-1].lower()
    out = Path(args.out or f"benchmarks/results/inference_{slug}.json")
    begin = time.perf_counter()
    model = build_model(
        num_layers=args.layers, max_len=max(args.lengths) + 1024, sparse_backend=args.sparse_backend
    )
    print(f"{device}: 7B-shaped model built in {time.perf_counter() - begin:.1f} s; layers "
          f"{model.layer_kinds()}", flush=True)  # fmt: skip
    pattern = next(
        layer.self_attn.longgen_pattern for layer in model.model.layers if layer.self_attn.longgen_pattern
    )
    kernel = model.model.sparse_kernel(
        pattern, device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=128
    )
    # Compile / autotune every kernel once, outside the timings.
    for kind in ("longgen", "full"):
        run_one(model, kind=kind, seq_len=4096, decode_tokens=4, warmup_decode=2, prefill_sdpa=args.sdpa_prefill,
                decode_sdpa=args.sdpa_decode, graphs=not args.no_graphs)  # fmt: skip
    rows: list[dict] = []
    meta = {
        "device": device,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": f"Llama-2-7B shape: {args.layers} layers, hidden 4096, 32 heads (MHA, head dim 128), ffn 11008, "
                 "vocab 32000, random bf16 weights, batch 1",
        "layer_pattern": model.layer_kinds(),
        "sparse": SPARSE,
        "sparse_kernel": getattr(kernel, "name", type(kernel).__name__),
        "sdpa_prefill_priority": args.sdpa_prefill,
        "sdpa_decode_priority": args.sdpa_decode,
        "kv_cache_bytes_note": "allocated K/V buffers: prompt + warmup + decode tokens for full layers, "
                               "sink + window blocks for sparse layers",
    }  # fmt: skip
    for seq in args.lengths:
        for kind in ("longgen", "full"):
            try:
                row = run_one(model, kind=kind, seq_len=seq, decode_tokens=args.decode_tokens,
                              warmup_decode=args.warmup_decode, prefill_sdpa=args.sdpa_prefill,
                              decode_sdpa=args.sdpa_decode, graphs=not args.no_graphs,
                              profile=args.profile)  # fmt: skip
            except torch.OutOfMemoryError as exc:
                row = {"model": kind, "seq_len": seq, "error": f"out of memory: {exc}"[:300]}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            comparison = comparisons(rows)
            write_json(out, {**meta, "rows": rows, "comparison": comparison, "targets_128k": targets(comparison),
                             "wall_s": time.perf_counter() - begin})  # fmt: skip
    comparison = comparisons(rows)
    print_table(rows, comparison)
    met = targets(comparison)
    if met:
        print(f"128K targets: KV <= {met['kv_ratio_max']} {'met' if met['kv_ratio_met'] else 'MISSED'}; prefill >= "
              f"{met['prefill_speedup_min']}x {'met' if met['prefill_speedup_met'] else 'MISSED'}; decode >= "
              f"{met['decode_speedup_min']}x {'met' if met['decode_speedup_met'] else 'MISSED'}")  # fmt: skip
    print(f"wrote {out} ({time.perf_counter() - begin:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
