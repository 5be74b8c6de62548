"""Where the sparse kernels' rate is capped: each backend run on a *dense causal* pattern (a sink+window
whose window covers the whole sequence) next to cuDNN's dense causal kernel, same shapes, same process.

    python tools/bench_kernel_ceiling.py                      # GPU; prints a table, writes JSON

If a backend reaches only a fraction f of cuDNN's TFLOP/s on dense causal work, it cannot exceed about f
on the (easier to schedule, but no denser) LongGen patterns either: that separates the kernel's own dense
efficiency from the cost of sparsity (tile tables, partial tiles, short rows). Writes
`benchmarks/results/attention_ceiling_<device>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import _dense_fn, _log, bench_one  # noqa: E402

from megatron_longgen.attention.kernels import available_kernels  # noqa: E402
from megatron_longgen.attention.masks import SinkWindowPattern, attended_pairs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--backends", nargs="+", default=["triton", "flex"])
    parser.add_argument("--budget-s", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernel_ceiling: needs a CUDA GPU", file=sys.stderr)
        return 2
    N, G, H, dtype = 32, 32, 128, torch.bfloat16
    registry = available_kernels()
    rows = []
    for S in args.seq_lens:
        flops = 3.5 * 4 * attended_pairs(None, S) * H * N  # fwd+bwd, causal pairs only
        dense, notes = _dense_fn(
            *(torch.randn(1, n, 256, H, device="cuda", dtype=dtype, requires_grad=True) for n in (N, G, G))
        )
        _, dense_ms, _, _, _ = bench_one(dense, B=1, N=N, G=G, S=S, H=H, dtype=dtype, budget_s=args.budget_s)
        rows.append(
            {
                "backend": notes[-1],
                "seq_len": S,
                "fwdbwd_ms": dense_ms,
                "tflops_fwdbwd": flops / dense_ms / 1e9,
                "ratio_to_cudnn": 1.0,
            }
        )
        _log(f"S={S} dense {notes[-1]}: {dense_ms:.2f} ms")
        pattern = SinkWindowPattern(block_size=64, num_sink_blocks=1, num_window_blocks=S // 64 + 1)
        for name in args.backends:
            kernel = registry[name]()
            fn = lambda q, k, v, kern=kernel: kern(q, k, v, pattern=pattern)  # noqa: E731
            _, ms, _, _, _ = bench_one(fn, B=1, N=N, G=G, S=S, H=H, dtype=dtype, budget_s=args.budget_s)
            rows.append(
                {
                    "backend": name,
                    "seq_len": S,
                    "fwdbwd_ms": ms,
                    "tflops_fwdbwd": flops / ms / 1e9,
                    "ratio_to_cudnn": dense_ms / ms,
                }
            )
            _log(f"S={S} {name} on dense causal: {ms:.2f} ms ({dense_ms / ms:.2f}x cuDNN's rate)")
    device = torch.cuda.get_device_name().replace(" ", "_").lower()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"B": 1, "num_heads": N, "num_kv_heads": G, "head_dim": H, "dtype": "bf16"},
        "flops_convention": "fwd+bwd = 3.5 * 4 * causal pairs * head_dim * heads",
        "rows": rows,
    }
    out = args.out or os.path.join("benchmarks", "results", f"attention_ceiling_{device.split('_')[-1]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\n{'backend':<28}{'S':>8}{'f+b ms':>10}{'TF/s':>8}{'x cuDNN':>9}")
    for r in rows:
        print(
            f"{r['backend']:<28}{r['seq_len']:>8}{r['fwdbwd_ms']:>10.2f}{r['tflops_fwdbwd']:>8.0f}{r['ratio_to_cudnn']:>9.2f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
