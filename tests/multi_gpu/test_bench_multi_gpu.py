"""`tools/bench_multi_gpu.py` at tiny sizes on 2 gloo ranks: every mode runs through its real CLI entry point
(`main([...])`, the same code torchrun runs) and writes a JSON whose figures are present, positive and finite
and agree with each other; the layout parsing, Megatron's CP group layout and the per-layer fit are checked
against hand-written expectations. GPU versions (8 GPUs, small sizes) are marked `multi_gpu`.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.multi_gpu.tool_loader import load_tool, run_torchrun

TOOL = "bench_multi_gpu"
COMMON = ["--tiny", "--steps", "1", "--peak-tflops", "1.0"]
RUNS = {
    "headline": ["headline", "--layout", "tp1-cp2", "--warmup", "1"],
    "cp_scaling": ["cp_scaling", "--warmup", "0", "--attention-iters", "1"],
    "slice70b": ["slice70b", "--layout", "tp2-cp1", "--layers", "1", "2", "--warmup", "0"],
}


def _worker(rank, world_size, root):
    bench = load_tool(TOOL)
    for name, argv in RUNS.items():
        assert bench.main([*argv, *COMMON, "--out", str(Path(root) / f"{name}.json")]) == 0
    return rank


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_multi_gpu")
    run_distributed(_worker, world_size=2, args=(str(root),), timeout_s=1500)
    return {name: json.loads((root / f"{name}.json").read_text()) for name in RUNS}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_header(result: dict, mode: str) -> None:
    assert result["mode"] == mode and result["gpus"] == 2 and result["device"] == "cpu"
    assert result["date_utc"] and result["versions"]["torch"] == torch.__version__


def _check_run(run: dict) -> None:
    for key in (
        "step_time_s",
        "tokens_per_s",
        "tokens_per_s_per_gpu",
        "peak_mem_gib",
        "tflops_per_gpu",
        "mfu",
        "mfu_dense_equiv",
    ):
        assert _positive(run[key]), (key, run[key])
    tokens = run["global_batch_size"] * run["seq_length"]
    assert run["tokens_per_s_per_gpu"] == pytest.approx(tokens / run["step_time_s"] / 2)
    assert all(math.isfinite(x) for x in run["losses"]) and len(run["losses"]) >= 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_headline_json(results):
    r = results["headline"]
    _check_header(r, "headline")
    assert r["layout"] | {"tp": 1, "pp": 1, "cp": 2, "dp": 1, "recompute": "full"} == r["layout"]
    for name in ("longgen", "full"):
        _check_run(r[name])
    assert set(r["longgen"]["pattern"]) == {"S", "F"} and set(r["full"]["pattern"]) == {"F"}
    # Sparse layers execute fewer FLOPs than the dense-equivalent count; a full model executes exactly that.
    assert r["longgen"]["mfu"] < r["longgen"]["mfu_dense_equiv"]
    assert r["full"]["mfu"] == pytest.approx(r["full"]["mfu_dense_equiv"])
    assert r["speedup"] == pytest.approx(r["longgen"]["tokens_per_s"] / r["full"]["tokens_per_s"])
    assert isinstance(r["targets"]["speedup_met"], bool)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_cp_scaling_json(results):
    r = results["cp_scaling"]
    _check_header(r, "cp_scaling")
    assert [(row["layout"]["tp"], row["layout"]["cp"]) for row in r["rows"]] == [(2, 1), (1, 2)]
    for row in r["rows"]:
        _check_run(row["train_step"]["longgen"])
        for kind in ("F", "S"):
            att = row["attention"][kind]
            assert _positive(att["cp1_ms"]) and _positive(att["cp_ms"]) and _positive(att["efficiency"])
            assert att["efficiency"] == pytest.approx(att["cp1_ms"] / (row["layout"]["cp"] * att["cp_ms"]))
    bytes_cp2 = r["rows"][1]["attention"]["bytes"]
    # Ring: the other rank's K/V once; tiny 7B stand-in: 4 KV heads / TP1, head dim 16, 256 local tokens, bf16.
    assert bytes_cp2["F"] == bytes_cp2["allgather"] == 2 * 4 * 256 * 16 * 2
    assert 0 < bytes_cp2["S"] < bytes_cp2["allgather"]
    assert r["rows"][0]["attention"]["bytes"]["F"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_slice70b_json(results):
    r = results["slice70b"]
    _check_header(r, "slice70b")
    assert sorted((run["kind"], run["layers"]) for run in r["runs"]) == [
        ("F", 1),
        ("F", 2),
        ("S", 1),
        ("S", 2),
    ]
    for run in r["runs"]:
        _check_run(run)
        assert run["pattern"] == run["kind"] * run["layers"]
    for kind in ("S", "F"):
        fit = r["per_layer"][kind]
        assert all(
            math.isfinite(fit[k]["per_layer"]) and math.isfinite(fit[k]["rest"])
            for k in ("step_time_s", "peak_mem_gib")
        )


# ----------------------------------------------------------------------------------------- pure functions
def test_parse_layout():
    bench = load_tool(TOOL)
    lay = bench.parse_layout("tp2-pp2-cp2", world=16, recompute="selective")
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.recompute) == (2, 2, 2, 2, "selective")
    assert bench.parse_layout("tp8", world=8, recompute="full").dp == 1
    with pytest.raises(ValueError, match="world size 8 is not a multiple of tp\\*pp\\*cp = 3"):
        bench.parse_layout("tp3", world=8, recompute="full")
    with pytest.raises(ValueError, match="tp\\*pp\\*cp\\*dp = 16 but the world has 8"):
        bench.parse_layout("tp8-dp2", world=8, recompute="full")
    with pytest.raises(ValueError, match="parts look like"):
        bench.parse_layout("tp8-xx2", world=8, recompute="full")


def test_cp_groups_follow_megatron_order():
    bench = load_tool(TOOL)
    # Order tp-cp-dp: a CP group holds ranks TP apart; DP replicas repeat the pattern.
    assert bench.cp_groups(world=8, tp=2, cp=2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert bench.cp_groups(world=8, tp=1, cp=8) == [list(range(8))]
    assert bench.cp_groups(world=8, tp=8, cp=1) == [[r] for r in range(8)]
    assert bench.cp_groups(world=8, tp=2, cp=4) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_per_layer_fit():
    bench = load_tool(TOOL)
    runs = [
        {
            "kind": "S",
            "layers": 2,
            "step_time_s": 3.0,
            "peak_mem_gib": 20.0,
            "planner_prediction": {"step_time_s": 2.5, "peak_mem_gib": 18.0},
        },
        {
            "kind": "S",
            "layers": 4,
            "step_time_s": 5.0,
            "peak_mem_gib": 26.0,
            "planner_prediction": {"step_time_s": 4.5, "peak_mem_gib": 22.0},
        },
        {"kind": "F", "layers": 2, "step_time_s": 9.0, "peak_mem_gib": 30.0, "planner_prediction": None},
    ]
    fit = bench.per_layer(runs, kind="S")
    assert fit["step_time_s"] == {
        "per_layer": 1.0,
        "rest": 1.0,
        "predicted_per_layer": 1.0,
        "predicted_rest": 0.5,
        "measured_over_predicted": 1.0,
    }
    assert fit["peak_mem_gib"]["per_layer"] == 3.0 and fit["peak_mem_gib"]["measured_over_predicted"] == 1.5
    assert bench.per_layer(runs, kind="F") is None  # one depth: no slope


def test_auto_layout_without_planner_and_explicit_planner_error(monkeypatch):
    bench = load_tool(TOOL)
    cfg = bench.model_config("7b", tiny=True, seq_len=None)  # 4 KV heads
    args = types.SimpleNamespace(layout="auto", planner_gpu=None, tiny=True, recompute="full")
    lay = bench.choose_layout(args, cfg, world=8)
    assert (lay.tp, lay.cp, lay.dp) == (4, 2, 1)
    monkeypatch.setattr(bench, "_planner", lambda: None)
    args.layout = "planner"
    with pytest.raises(ValueError, match="pass an explicit layout"):
        bench.choose_layout(args, cfg, world=8)


def test_planner_layout_and_prediction():
    pytest.importorskip("megatron_longgen.launch.plan")
    from megatron_longgen.recipes import with_full_attention

    bench = load_tool(TOOL)
    full = with_full_attention(bench.model_config("7b", tiny=False, seq_len=None))
    args = types.SimpleNamespace(layout="planner", planner_gpu="h200", tiny=False, recompute="full")
    lay = bench.choose_layout(args, full, world=8)
    assert lay.tp * lay.pp * lay.cp * lay.dp == 8 and lay.source == "planner"
    pred = bench.planner_prediction(bench.with_layout(full, lay), lay, gpu_name="h200")
    assert _positive(pred["step_time_s"]) and _positive(pred["peak_mem_gib"]) and 0 < pred["mfu"] < 1


# ----------------------------------------------------------------------------------------- GPUs
def _gpus() -> int:
    return min(8, torch.cuda.device_count())


@pytest.mark.multi_gpu
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "mode,argv",
    [
        ("headline", ["--seq-len", "16384"]),
        ("cp_scaling", ["--seq-lengths", "16384", "--cp-sizes", "1", "2", "--attention-iters", "1"]),
        ("slice70b", ["--seq-len", "16384", "--layers", "1", "2"]),
    ],
)
def test_modes_on_gpus(tmp_path, mode, argv):
    n = _gpus()
    out = tmp_path / f"{mode}.json"
    layout = [] if mode == "cp_scaling" else ["--layout", f"tp{n}"]
    proc = run_torchrun(
        f"{TOOL}.py",
        [mode, *argv, *layout, "--steps", "1", "--warmup", "1", "--out", str(out)],
        nproc=n,
        timeout_s=850,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["gpus"] == n and result["device"] != "cpu"
    runs = (
        [result["longgen"], result["full"]]
        if mode == "headline"
        else [row["train_step"]["longgen"] for row in result["rows"]]
        if mode == "cp_scaling"
        else result["runs"]
    )
    for run in runs:
        assert _positive(run["step_time_s"]) and _positive(run["peak_mem_gib"]) and _positive(run["mfu"])
