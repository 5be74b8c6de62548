"""The planner: candidates respect every constraint, the ranking and the recommendation rule, the checkpoint
estimate, and the validation against whatever measurement files exist."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from megatron_longgen.config import apply_overrides
from megatron_longgen.launch.gpus import GPUS, get_gpu
from megatron_longgen.launch.layout import Layout, placement
from megatron_longgen.launch.plan import candidate_layouts, checkpoint_save_estimate, plan, recommend
from megatron_longgen.launch.validation import validate_against_measurements
from megatron_longgen.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_candidates_respect_heads_sequence_and_batch():
    cfg = get_recipe("llama2_70b_128k")  # 64 query / 8 KV heads, seq 131072, global batch 32, block 64
    layouts = candidate_layouts(cfg, world_size=64, gpus_per_node=8)
    assert layouts and len(set(layouts)) == len(layouts)
    for lay in layouts:
        assert lay.world_size == 64 and lay.tp <= 8
        assert 64 % lay.tp == 0 and (8 % lay.tp == 0 or lay.tp % 8 == 0)
        assert 131072 % (2 * lay.cp * 64) == 0
        assert 32 % (lay.micro_batch_size * lay.dp) == 0
    assert {lay.recompute for lay in layouts} == {"none", "selective", "full"}
    assert Layout(tp=8, pp=1, cp=8, dp=1, recompute="full") in layouts
    with pytest.raises(ValueError, match="need world_size >= 1"):
        candidate_layouts(cfg, world_size=0, gpus_per_node=8)


def test_placement_follows_megatron_rank_order():
    where = placement(Layout(tp=4, pp=2, cp=2, dp=4, recompute="full"), gpus_per_node=8)
    assert where["tp"] and where["cp"]  # tp x cp = 8 ranks: one node
    assert not where["dp"] and not where["pp"] and not where["dp_cp"]


def test_ranking_and_recommendation_on_the_7b_recipe():
    cfg = get_recipe("llama2_7b_128k")
    gpu = get_gpu("h100-80gb")
    rows = plan(cfg, world_size=64, gpu=gpu, headroom=0.1)
    tiers = [0 if r.fits_within(0.1) else 1 if r.fits else 2 for r in rows]
    assert tiers == sorted(tiers) and tiers[0] == 0 and tiers[-1] == 2
    first_tier = [r.tokens_per_s_per_gpu for r, t in zip(rows, tiers) if t == 0]
    assert first_tier == sorted(first_tier, reverse=True)
    best = recommend(rows, headroom=0.1, tie=0.05)
    assert best.fits_within(0.1) and best.tokens_per_s_per_gpu >= 0.95 * rows[0].tokens_per_s_per_gpu
    simplest = min(
        (r.layout.pp > 1) + (r.layout.cp > 1)
        for r in rows
        if r.fits_within(0.1) and r.tokens_per_s_per_gpu >= 0.95 * rows[0].tokens_per_s_per_gpu
    )
    assert (best.layout.pp > 1) + (best.layout.cp > 1) == simplest
    # The recipe's default is the planner's recommendation for 8 x 8 H100-80GB (recipes.py).
    assert (best.layout.tp, best.layout.pp, best.layout.cp, best.layout.recompute) == (
        cfg.parallel.tensor_parallel,
        cfg.parallel.pipeline_parallel,
        cfg.parallel.context_parallel,
        cfg.train.recompute,
    )
    # Selective recompute never pays with flash-style kernels: more time than none, and (without CP, where the
    # sparse exchange changes which K/V buffers stay alive) about the same memory.
    none = {
        (r.layout.tp, r.layout.pp, r.layout.cp, r.layout.micro_batch_size): r
        for r in rows
        if r.layout.recompute == "none"
    }
    for r in rows:
        if r.layout.recompute == "selective":
            twin = none[(r.layout.tp, r.layout.pp, r.layout.cp, r.layout.micro_batch_size)]
            assert r.step.total > twin.step.total
            if r.layout.cp == 1:
                assert r.peak_bytes < twin.peak_bytes < 1.01 * r.peak_bytes


def test_70b_recipe_default_is_the_recommendation_and_lighter_gpus_fit_less():
    cfg = get_recipe("llama2_70b_128k")
    rows = plan(cfg, world_size=64, gpu=get_gpu("h100-80gb"), headroom=0.1)
    best = recommend(rows, headroom=0.1)
    assert (best.layout.tp, best.layout.pp, best.layout.cp, best.layout.recompute) == (8, 1, 8, "full")
    h200 = plan(cfg, world_size=64, gpu=get_gpu("h200"), headroom=0.1)
    assert sum(r.fits for r in h200) > sum(r.fits for r in rows)
    a100 = plan(cfg, world_size=64, gpu=get_gpu("a100-80gb"), headroom=0.1)
    assert recommend(a100).tokens_per_s_per_gpu < best.tokens_per_s_per_gpu  # 312 vs 989 TFLOP/s


def test_checkpoint_estimate_by_hand():
    cfg = apply_overrides(
        get_recipe("llama2_7b_128k"), ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false"]
    )
    est = checkpoint_save_estimate(cfg, Layout(tp=1, pp=1, cp=1, dp=32, recompute="full"), fs_write_gbps=10)
    params = (
        32000 * 4096 * 2
        + 32 * (4096 * 3 * 4096 + 4096 * 4096 + 4096 * 2 * 11008 + 11008 * 4096 + 2 * 4096)
        + 4096
    )
    assert est.total_bytes == 14 * params  # bf16 weights + fp32 main params + Adam m, v
    assert est.busiest_gpu_bytes == pytest.approx(2 * params + 12 * params / 32)
    assert est.save_s == pytest.approx(14 * params / 10e9)  # the file system is the bottleneck here
    slow_writer = checkpoint_save_estimate(
        cfg, Layout(tp=1, pp=1, cp=1, dp=32, recompute="full"), fs_write_gbps=1000, per_gpu_write_gbps=1
    )
    assert slow_writer.save_s == pytest.approx(est.busiest_gpu_bytes / 1e9)  # one writer is
    with pytest.raises(ValueError, match="must be > 0 GB/s"):
        checkpoint_save_estimate(cfg, Layout(tp=1, pp=1, cp=1, dp=32, recompute="full"), fs_write_gbps=0)


def test_gpu_table_is_complete():
    for spec in GPUS.values():
        assert spec.usable_bytes < spec.memory_gib * 2**30
        assert (
            spec.matmul_tflops <= spec.peak_bf16_tflops and spec.dense_attn_tflops[0] <= spec.peak_bf16_tflops
        )
        assert spec.sparse_rate("sink_window", "auto") == spec.sparse_attn_tflops["sink_window/triton"]
        assert spec.sparse_rate("block_strided", "flex")
    with pytest.raises(ValueError, match="unknown GPU 'v100'"):
        get_gpu("v100")
    with pytest.raises(ValueError, match="no sparse attention rate for sink_window/torch"):
        get_gpu("h200").sparse_rate("sink_window", "torch")


def test_validation_reads_whatever_measurements_exist(tmp_path):
    for name in ("train_step_h200.json", "context_parallel_h200.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, tmp_path / name)
    # A new-style file: several recompute modes, one out-of-memory row, one run cut by the time budget.
    rows = [
        {
            "pattern": "SSFFSS",
            "seq_length": 131072,
            "recompute": "none",
            "sparse_variant": "sink_window",
            "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
        },
        {
            "pattern": "FFFFFF",
            "seq_length": 131072,
            "recompute": "none",
            "error": "not run: time budget of 330 s spent",
        },
    ]
    (tmp_path / "train_step_recompute_h200.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "rates": {
                    "gemm_tflops": {"qkv_fwd": 700.0},
                    "gemm_tflops_harmonic_mean": 700.0,
                    "copy_gbps": 4000.0,
                },
            }
        )
    )
    result = validate_against_measurements(tmp_path)
    assert result["sources"] == [
        "train_step_h200.json",
        "train_step_recompute_h200.json",
        "context_parallel_h200.json",
    ]
    measured = [r for r in result["train_step"] if "mem_error" in r]
    assert len(measured) == 6 and all(
        abs(r["mem_error"]) < 0.10 and abs(r["time_error"]) < 0.20 for r in measured
    )
    oom = next(r for r in result["train_step"] if r.get("measured") == "OOM")
    assert (
        oom["predicted_fits"] is False and oom["ok"] is True
    )  # 128K without recompute: predicted not to fit
    skipped = next(r for r in result["train_step"] if r["pattern"] == "FFFFFF" and r["recompute"] == "none")
    assert skipped["ok"] is None
    full_cudnn = next(
        r for r in result["context_parallel"] if r["layer"] == "full" and r["kernel"] == "cudnn"
    )
    assert abs(full_cudnn["time_error"]) < 0.05 and abs(full_cudnn["rate_error"]) < 0.10
    assert result["measured_rates"]["train_step_recompute_h200.json"]["copy_gbps"] == 4000.0


def test_layout_dataclass_round_trip():
    lay = Layout(tp=2, pp=1, cp=4, dp=8, recompute="full")
    assert dataclasses.replace(lay) == lay and lay.world_size == 64 and lay.short() == "TP2 PP1 CP4 DP8"
    assert not Layout(tp=1, pp=1, cp=1, dp=1, recompute="none").sp
