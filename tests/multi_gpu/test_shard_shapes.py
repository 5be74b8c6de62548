"""`tools/bench_shard_shapes.py`: one GPU's shard of a layer is what Megatron's tensor parallelism really puts on
a GPU (parameter shapes of a real TP=2 model on 2 gloo ranks), and the CPU smoke run writes rows whose sizes
and FLOPs match hand arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.multi_gpu.tool_loader import ROOT, load_tool

TOOL = "bench_shard_shapes"


def _layer_shapes(model) -> dict:
    return {
        name: tuple(p.shape) for name, p in model.named_parameters() if name.startswith("decoder.layers.0.")
    }


def _worker(rank, world_size):
    """Layer 0's parameter shapes on TP rank `rank` of a real TP=2 model, and those of the shard model."""
    from megatron_longgen.config import apply_overrides
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    tool = load_tool(TOOL)
    base = tool.base_config("tiny")
    out = {}
    for kind in ("F", "S"):
        real = apply_overrides(
            base,
            [
                "parallel.tensor_parallel=2",
                "parallel.sequence_parallel=true",
                "model.num_layers=2",
                f"model.layer_pattern={kind * 2}",
            ],
        )
        initialize_model_parallel(real)
        set_seed(0)
        out[(kind, "real")] = _layer_shapes(build_model(real, pre_process=False, post_process=False))
        cfg, tcfg = tool.shard_config(
            base, tp=2, cp=2, kind=kind, num_layers=2, dtype="fp32", recompute="none", backend="auto"
        )
        initialize_model_parallel(cfg)
        out[(kind, "shard")] = _layer_shapes(
            build_model(cfg, transformer_config=tcfg, pre_process=False, post_process=False)
        )
        out[(kind, "shard_tokens")] = cfg.train.seq_length
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shard_has_the_shapes_of_a_real_tp_rank():
    results = run_distributed(_worker, world_size=2, timeout_s=540)
    base = load_tool(TOOL).base_config("tiny")
    for res in results:
        for kind in ("F", "S"):
            real, shard = res[(kind, "real")], res[(kind, "shard")]
            assert real == shard, (kind, real, shard)
            assert res[(kind, "shard_tokens")] == base.train.seq_length // 2
    # Spelled out for the tiny model (h 128, 4/2 heads of 32, f 256) at TP2: column-parallel outputs and
    # row-parallel inputs halved, the residual width kept.
    shard = results[0][("F", "shard")]
    assert shard["decoder.layers.0.self_attention.linear_qkv.weight"] == ((2 + 2 * 1) * 32, 128)
    assert shard["decoder.layers.0.self_attention.linear_proj.weight"] == (128, 2 * 32)
    assert shard["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 128, 128)
    assert shard["decoder.layers.0.mlp.linear_fc2.weight"] == (128, 128)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_tiny_rows(tmp_path):
    out = tmp_path / "shards.json"
    env = dict(
        os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{TOOL}.py"), "--tiny", "--iters", "1", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["left_out"] and result["row_fields"]
    rows = result["rows"]
    assert sorted((r["tp"], r["cp"], r["kind"]) for r in rows) == sorted(
        (tp, cp, k) for tp, cp in ((2, 1), (1, 2), (2, 2)) for k in "FS"
    )
    h, n, g, d, f, s = 128, 4, 2, 32, 256, 512  # the tiny model
    for r in rows:
        t, c = r["tp"], r["cp"]
        assert r["shard"] == {
            "hidden": h,
            "heads": n // t,
            "kv_heads": g // t,
            "head_dim": d,
            "ffn": f // t,
            "local_tokens": s // c,
        }
        params = h * (n + 2 * g) * d // t + n * d * h // t + h * 2 * f // t + f * h // t + 2 * h
        assert r["weight_bytes_per_layer"] == r["grad_bytes_per_layer"] == 4 * params  # fp32 on CPU
        for key in ("fwd_s_per_layer", "bwd_s_per_layer", "saved_bytes_per_layer", "flops_per_layer"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert math.isfinite(r["compute_s_per_layer"]) and math.isfinite(r["tflops_per_s"])
        assert ("attention" in r) == (c > 1)
        if r["kind"] == "F":
            linear = 2 * h * (n + 2 * g) * d + 2 * n * d * h + 2 * h * 2 * f + 2 * f * h
            pairs = s * (s + 1) // 2
            assert r["flops_per_layer"] == pytest.approx(
                3 * ((s / c) * linear / t + 4 * n * d * pairs / (t * c))
            )


def test_saved_bytes_counts_activations_once_and_skips_weights():
    tool = load_tool(TOOL)
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with tool.SavedBytes({w.untyped_storage().data_ptr()}) as saved:
        y = x @ w  # saves x and w
        z = y * y  # saves y (twice: once counted)
    assert saved.total == x.numel() * 4 + y.numel() * 4
    z.sum().backward()


def test_bad_shards_are_refused():
    tool = load_tool(TOOL)
    with pytest.raises(ValueError, match="must look like TPxCP"):
        tool.parse_shard("8")
    base = tool.base_config("7b")
    with pytest.raises(ValueError, match="num_attention_heads 32 is not divisible by tp 3"):
        tool.shard_config(
            base, tp=3, cp=1, kind="F", num_layers=1, dtype="bf16", recompute="none", backend="auto"
        )
    with pytest.raises(ValueError, match="multiple of 2\\*cp\\*block = 96"):
        tool.shard_config(
            tool.base_config("tiny"),
            tp=1,
            cp=3,
            kind="S",
            num_layers=1,
            dtype="fp32",
            recompute="none",
            backend="auto",
        )


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_shard_shapes_on_gpu(tmp_path):
    out = tmp_path / "shards.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / f"{TOOL}.py"),
            "--models",
            "7b",
            "--shards",
            "8x1",
            "4x2",
            "--seq-len",
            "16384",
            "--iters",
            "1",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=550,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all("error" not in r for r in rows)
    for r in rows:
        assert r["peak_mem_gib"] > 0 and r["peak_transient_bytes"] is not None and r["tflops_per_s"] > 1
