"""tools/bench_inference.py's measuring code on a tiny model on CPU (the GPU run is the lead's): rows,
byte accounting and the LongGen/full comparison."""

import sys

from tests.inference.reference import tiny_config, tiny_model

sys.path.insert(0, "tools")
try:
    import bench_inference
finally:
    sys.path.pop(0)


def test_rows_and_comparison_on_cpu():
    model = tiny_model(tiny_config(layer_pattern="SFFS", block_size=16, num_window_blocks=2), seed=0)
    options = {"seq_len": 256, "decode_tokens": 4, "warmup_decode": 1, "prefill_sdpa": "math",
               "decode_sdpa": "math", "graphs": True}  # fmt: skip
    rows = [bench_inference.run_one(model, kind=kind, **options) for kind in ("longgen", "full")]
    longgen, full = rows
    assert longgen["layer_kinds"] == "SFFS" and full["layer_kinds"] == "FFFF"
    assert longgen["context_after_decode"] == 256 + 1 + 4  # warmup + timed tokens fed back
    assert (
        "decode_ms_per_token_graph" not in longgen and longgen["decode_mode"] == "eager"
    )  # graphs need CUDA
    per_slot = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head dim 16, fp32
    reserve = 256 + 2 * (1 + 4) + 1
    assert full["kv_cache_bytes"] == 4 * reserve * per_slot
    assert longgen["kv_cache_bytes_by_kind"] == {
        "full": 2 * reserve * per_slot,
        "sink_window": 2 * 48 * per_slot,
    }
    (comparison,) = bench_inference.comparisons(rows)
    assert comparison["kv_ratio"] == longgen["kv_cache_bytes"] / full["kv_cache_bytes"] < 0.6
    assert comparison["prefill_speedup"] > 0 and comparison["decode_speedup"] > 0
    assert bench_inference.targets([comparison]) is None  # only judged at 128K
    at_128k = dict(comparison, seq_len=131072, kv_ratio=0.36, prefill_speedup=1.9, decode_speedup=1.5)
    met = bench_inference.targets([at_128k])
    assert met["kv_ratio_met"] and met["prefill_speedup_met"] and not met["decode_speedup_met"]
