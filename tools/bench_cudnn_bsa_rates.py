"""How fast cuDNN's block-sparse attention kernels are on their own, next to cuDNN dense in the same run.

The `cudnn_bsa` backend (megatron_longgen/attention/kernels/cudnn_bsa.py) gives cuDNN every whole tile of
a pattern; this tool measures what those tiles can reach: forward and backward TF/s on the computed
(query, key) pairs of a synthetic window pattern (each query tile sees the previous W tiles, all whole),
for 64- and 128-token tiles and several backward bucket sizes, against cuDNN's dense causal kernel's
forward and backward rates. Peak extra memory of each backward call is reported as a fraction of the
Q/K/V/O bytes. Needs a Hopper GPU and `nvidia-cudnn-frontend[cutedsl]`.

    python tools/bench_cudnn_bsa_rates.py            # 128K with 2,048 keys per query, 16K near-dense
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import _time_ms  # noqa: E402  (tools/ is not a package)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def window_index(n_tiles: int, width: int, *, batch: int, heads: int, device):
    """Query tile i lists key tiles max(0, i - width + 1) .. i (ascending), padded with 0."""
    qt = torch.arange(n_tiles, device=device)[:, None]
    kt = qt - width + 1 + torch.arange(width, device=device)[None, :]
    valid = kt >= 0
    counts = valid.sum(dim=1).to(torch.int32)
    # Valid entries first: shift each row left by its number of negative slots.
    shift = (~valid).sum(dim=1, keepdim=True)
    cols = (torch.arange(width, device=device)[None, :] + shift).clamp(max=width - 1)
    index = torch.where(torch.arange(width, device=device)[None, :] < counts[:, None], kt.gather(1, cols), 0)
    index = index.to(torch.int32)
    return (
        index[None, None].expand(batch, heads, n_tiles, width).contiguous(),
        counts[None, None].expand(batch, heads, n_tiles).contiguous(),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", nargs="+", default=["131072:2048", "16384:16384"], help="seq_len:keys_per_query pairs"
    )
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--buckets", nargs="+", default=["default", "64", "128", "1152", "4096"])
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/cudnn_bsa_rates_<device>.json)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cudnn_bsa_rates.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from cudnn.block_sparse_attention import block_sparse_attention_backward as bsa_bwd
    from cudnn.block_sparse_attention import block_sparse_attention_forward as bsa_fwd
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    B, N, H = 1, args.heads, 128
    rows = []
    for case in args.cases:
        S, keys = (int(x) for x in case.split(":"))
        q, k, v, d_out = (torch.randn(B, N, S, H, device=dev, dtype=torch.bfloat16) for _ in range(4))
        qkvo = 4 * q.numel() * q.element_size()
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))

        def dense_fwd(q=q, k=k, v=v):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        def dense_fwd_bwd(qd=qd, kd=kd, vd=vd, d_out=d_out):
            qd.grad = kd.grad = vd.grad = None
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True).backward(d_out)

        pairs = S * (S + 1) / 2
        f_ms, fb_ms = _time_ms(dense_fwd, budget_s=0.5), _time_ms(dense_fwd_bwd, budget_s=0.5)
        dense_fwd_tf = 4 * pairs * H * N / f_ms / 1e9
        dense_bwd_tf = 10 * pairs * H * N / (fb_ms - f_ms) / 1e9
        _log(
            f"S={S} dense cuDNN: fwd {f_ms:.2f} ms {dense_fwd_tf:.0f} TF/s, bwd {fb_ms - f_ms:.2f} ms {dense_bwd_tf:.0f} TF/s"
        )
        rows.append({"seq_len": S, "kernel": "dense_cudnn_causal", "fwd_ms": f_ms, "bwd_ms": fb_ms - f_ms,
                     "fwd_tflops": dense_fwd_tf, "bwd_tflops": dense_bwd_tf})  # fmt: skip
        for tile in (64, 128):
            n_tiles, width = S // tile, min(keys // tile, S // tile)
            index, counts = window_index(n_tiles, width, batch=B, heads=N, device=dev)
            computed = float(counts[0, 0].sum().item()) * tile * tile
            kw = {"q2k_block_nums": counts, "sparse_block_size": tile}

            def fwd(kw=kw, index=index, q=q, k=k, v=v):
                return bsa_fwd(q, k, v, index, allow_empty_block_nums=False, **kw)

            res = fwd()
            out, lse = res["o_tensor"], res["lse_tensor"]
            t = _time_ms(fwd, budget_s=0.3)
            tf = 4 * computed * H * N / t / 1e9
            _log(f"S={S} tile {tile}: fwd {t:.2f} ms {tf:.0f} TF/s = {tf / dense_fwd_tf:.2f}x dense fwd")
            rows.append({"seq_len": S, "kernel": "cudnn_bsa_fwd", "tile": tile, "tiles_per_row": width, "fwd_ms": t,
                         "fwd_tflops": tf, "ratio_to_dense_fwd": tf / dense_fwd_tf})  # fmt: skip
            for bucket in args.buckets:
                bucket_blocks = None if bucket == "default" else int(bucket)

                def bwd(
                    kw=kw,
                    index=index,
                    out=out,
                    lse=lse,
                    bucket_blocks=bucket_blocks,
                    q=q,
                    k=k,
                    v=v,
                    d_out=d_out,
                ):
                    bsa_bwd(d_out, q, k, v, out, lse, index, bucket_size_blocks=bucket_blocks, **kw)

                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t = _time_ms(bwd, budget_s=0.3)
                extra = torch.cuda.max_memory_allocated() - base - 3 * q.numel() * q.element_size()
                tf = 10 * computed * H * N / t / 1e9
                _log(f"S={S} tile {tile} bucket {bucket}: bwd {t:.2f} ms {tf:.0f} TF/s = "
                     f"{tf / dense_bwd_tf:.2f}x dense bwd; workspace {extra / qkvo:.0%} of QKVO")  # fmt: skip
                rows.append({"seq_len": S, "kernel": "cudnn_bsa_bwd", "tile": tile, "bucket": bucket, "bwd_ms": t,
                             "bwd_tflops": tf, "ratio_to_dense_bwd": tf / dense_bwd_tf,
                             "workspace_frac_qkvo": extra / qkvo})  # fmt: skip
        del q, k, v, d_out, qd, kd, vd
        torch.cuda.empty_cache()
    import cudnn

    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "cudnn_frontend": getattr(cudnn, "__version__", "unknown"), "python": platform.python_version(),
        "shape": {"B": B, "num_heads": N, "head_dim": H, "dtype": "bf16"},
        "flop_convention": "fwd = 4 * computed pairs * H * N; bwd = 2.5 x fwd; dense counts causal pairs",
        "rows": rows,
    }  # fmt: skip
    slug = meta["device"].lower().replace("nvidia", "").strip().replace(" ", "_")
    path = args.out or os.path.join("benchmarks", "results", f"cudnn_bsa_rates_{slug}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, path)
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
