"""TP2 x PP2 x CP2 together (sequence parallelism, distributed optimizer, `SSFFFFSS`) on 8 gloo ranks equals one
process: loss, gradient norm and the gradient of every parameter after one step, losses and weights over the
steps of a run, and its checkpoint resumed at TP1 x PP1 x CP1 (`tools/check_parallel_equivalence.py`).

The 8 ranks start once, the single process once; the tests assert on the tool's own checks and on what the
runs returned. fp32 on CPU: tolerances 1e-5 (losses, norms) and 1e-4 (tensors), relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.multi_gpu.tool_loader import load_tool, run_torchrun

TOOL = "check_parallel_equivalence"
LAYOUT = {"tp": 2, "pp": 2, "cp": 2}
STEPS = {"steps_before_save": 2, "steps_after_save": 1}


def _options():
    return load_tool(TOOL).Options(**LAYOUT, **STEPS)


def _parallel(rank, world_size, work):
    tool = load_tool(TOOL)
    return tool.run_layout(Path(work), _options(), **LAYOUT, dtype="fp32", tag="parallel", init_dir=None)


def _single(rank, world_size, work):
    return load_tool(TOOL).run_single(Path(work), _options(), reference_dir=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("equivalence")
    parallel = run_distributed(_parallel, world_size=8, args=(str(work),), timeout_s=1500)[0]
    single = run_distributed(_single, world_size=1, args=(str(work),), timeout_s=900)[0]
    checks = load_tool(TOOL).compare(parallel, single, dtype="fp32")
    return {"work": work, "parallel": parallel, "single": single, "checks": checks}


def _failed(checks, prefix):
    selected = [c for c in checks if c["name"].startswith(prefix)]
    assert selected, prefix
    return [(c["name"], c["err"], c["bound"]) for c in selected if not c["ok"]]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_runs_used_the_requested_layout(runs):
    assert runs["parallel"]["layout_seen"] == {**LAYOUT, "dp": 1, "world": 8}
    assert runs["single"]["reference"]["fp32"]["layout_seen"] == {
        "tp": 1,
        "pp": 1,
        "cp": 1,
        "dp": 1,
        "world": 1,
    }


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_gradients_match_one_process(runs):
    grads = runs["parallel"]["grads"]
    # Every parameter of the 8-layer model, in global names: both stages' layers, embedding and output layer.
    layers = {int(name.split(".")[2]) for name in grads if name.startswith("decoder.layers.")}
    assert layers == set(range(8))
    assert {
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.final_layernorm.weight",
    } <= set(grads)
    for prefix in ("run 1 loss", "run 1 grad norm", "run 1 gradient"):
        assert not _failed(runs["checks"], prefix), _failed(runs["checks"], prefix)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_reference_gradients_are_not_trivial(runs):
    grads = runs["single"]["reference"]["fp32"]["grads"]
    assert all(float(np.linalg.norm(g)) > 0 for g in grads.values()), [
        k for k, g in grads.items() if not g.any()
    ]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_training_steps_match_one_process(runs):
    for prefix in (
        "run 2 losses",
        "run 2 grad norms",
        "run 2 weights at the checkpoint",
        "run 2 final weights",
    ):
        assert not _failed(runs["checks"], prefix), _failed(runs["checks"], prefix)
    par = runs["parallel"]
    assert len(par["losses"]) == sum(STEPS.values()) and all(np.isfinite(par["losses"]))
    moved = max(
        load_tool(TOOL).rel_err(par["weights_end"][k], par["weights_saved"][k]) for k in par["weights_end"]
    )
    assert moved > 1e-3  # the steps after the checkpoint changed the weights: the comparisons are not vacuous


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_checkpoint_saved_at_tp2_pp2_cp2_loads_exactly_at_tp1(runs):
    state = json.loads(
        (runs["work"] / "parallel_train" / "checkpoints" / "step_0000002" / "trainer_state.json").read_text()
    )
    assert state["parallel"] == {"tensor_parallel": 2, "pipeline_parallel": 2, "context_parallel": 2}
    assert state["optimizer_checkpoint_format"] == "fully_reshardable" and state["distributed_optimizer"]
    assert not _failed(runs["checks"], "resume: loaded weights")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_resumed_run_continues_like_the_parallel_run(runs):
    for prefix in ("resume: losses after", "resume: final weights"):
        assert not _failed(runs["checks"], prefix), _failed(runs["checks"], prefix)


# ----------------------------------------------------------------------------------------- pure functions
def test_merge_tp_rebuilds_megatron_shards():
    tool = load_tool(TOOL)
    f, h, tp = 6, 4, 2
    fc1 = torch.arange(2 * f * h, dtype=torch.float32).reshape(2 * f, h)  # [gate; up]
    gate, up = fc1.chunk(2)
    shards = [torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]) for r in range(tp)]  # what each TP rank holds
    torch.testing.assert_close(tool._merge_tp("decoder.layers.0.mlp.linear_fc1.weight", shards, 0), fc1)
    proj = torch.arange(h * 2 * f, dtype=torch.float32).reshape(h, 2 * f)
    torch.testing.assert_close(
        tool._merge_tp("decoder.layers.0.self_attention.linear_proj.weight", list(proj.chunk(tp, dim=1)), 1),
        proj,
    )


def test_bf16_rule_and_missing_tensors():
    tool = load_tool(TOOL)
    gold, single = [2.0], [2.02]  # the single bf16 run is 1% off the fp32 gold
    bound = 3 * 0.01 + 2**-8
    ok = tool.compare_values("x", [2.0 * (1 + bound * 0.9)], gold, noise=(single, gold))
    bad = tool.compare_values("x", [2.0 * (1 + bound * 1.1)], gold, noise=(single, gold))
    assert all(c["ok"] for c in ok) and not bad[-1]["ok"]
    assert bad[-1]["bound"] == pytest.approx(bound)
    missing = tool.compare_values("w", {"a": np.ones(3)}, {"a": np.ones(3), "b": np.ones(2)}, rtol=1e-4)
    assert [c["ok"] for c in missing] == [False, True, False]


def test_config_pads_the_vocabulary_alike_and_validates_the_layout():
    from megatron_longgen.models.builder import model_vocab_size

    tool = load_tool(TOOL)
    opts = _options()
    par = tool.equivalence_config(opts, tp=2, pp=2, cp=2, distributed_optimizer=True)
    one = tool.equivalence_config(opts, tp=1, pp=1, cp=1, distributed_optimizer=True)
    # Megatron does not mask padded logits: the two models are the same function only if they pad alike.
    assert model_vocab_size(par) == model_vocab_size(one)
    assert par.parallel.sequence_parallel and not one.parallel.sequence_parallel
    with pytest.raises(ValueError, match="num_query_groups 2 < tensor_parallel 4"):
        tool.equivalence_config(opts, tp=4, pp=1, cp=1, distributed_optimizer=True)


def test_saved_reference_must_match_the_run(tmp_path):
    tool = load_tool(TOOL)
    other = tool.Options(**LAYOUT, **STEPS, pattern="SFFS")
    torch.save({"options": tool._identity(other), "runs": {}}, tmp_path / "reference.pt")
    with pytest.raises(ValueError, match="was made for .*SFFS"):
        tool.run_single(tmp_path, _options(), reference_dir=tmp_path)


# ----------------------------------------------------------------------------------------- the CLI
def _assert_report(report: dict, *, proc, layout: dict) -> None:
    assert report["layout"]["tp"] == layout["tp"] and report["layout"]["cp"] == layout["cp"], report["layout"]
    assert report["num_checks"] == len(report["checks"]) > 20
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    assert report["ok"] and proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cli_under_torchrun_writes_the_report(tmp_path):
    """The command the GPUs run, on 2 CPU ranks: torchrun, then rank 0's single-process child."""
    out = tmp_path / "report.json"
    proc = run_torchrun(
        f"{TOOL}.py",
        [
            "--tiny",
            "--tp",
            "2",
            "--pp",
            "1",
            "--cp",
            "1",
            "--steps-before-save",
            "1",
            "--steps-after-save",
            "1",
            "--out",
            str(out),
        ],
        nproc=2,
        timeout_s=1100,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["options"]["dtype"] == "fp32"
    _assert_report(report, proc=proc, layout={"tp": 2, "cp": 1})


@pytest.mark.multi_gpu
@pytest.mark.timeout(900)
def test_tp2_pp2_cp2_on_eight_gpus_bf16(tmp_path):
    if torch.cuda.device_count() < 8:
        pytest.skip("TP2 x PP2 x CP2 needs 8 GPUs")
    out = tmp_path / "report.json"
    proc = run_torchrun(
        f"{TOOL}.py", ["--tp", "2", "--pp", "2", "--cp", "2", "--out", str(out)], nproc=8, timeout_s=850
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["options"]["dtype"] == "bf16" and report["world_size"] == 8
    _assert_report(report, proc=proc, layout=LAYOUT)
