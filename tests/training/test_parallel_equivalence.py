"""Two gloo ranks vs one: DP=2 equals DP=1 at the same global batch (plain and distributed optimizer),
PP=2 (plain 1F1B and interleaved with 2 virtual stages) with the cost-balanced layout and CP=2 (zig-zag
sharded batches through the trainer) equal the unsplit model, a TP=2 checkpoint resumes at TP=1 and a
distributed-optimizer checkpoint written at DP=2 resumes at DP=1 (resharding).
Workers start once per module; the tests assert on what they return."""

import json

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

STEPS = 5


def _params(trainer) -> dict:
    module = trainer.model[0].module
    # numpy, not tensors: torch's multiprocessing queue would pass tensors through shared memory that dies
    # with the worker process.
    return {name: p.detach().float().numpy().copy() for name, p in module.named_parameters()}


def _two_ranks(rank, world_size, root):
    from pathlib import Path

    from megatron_longgen.training.trainer import Trainer

    root = Path(root)
    out = {}
    # PP=2 builds its stages' layers from other RNG draws than PP=1, so it starts from the step-0
    # weights of the DP run (weights-only init, resharded to PP=2 on load).
    init = root / "step0" / "step_0000000"
    for name, extra in {
        "dp2_plain": ("parallel.use_distributed_optimizer=false",),
        "dp2_distopt": ("parallel.use_distributed_optimizer=true",),
        "pp2": (
            "parallel.pipeline_parallel=2",
            "parallel.use_distributed_optimizer=false",
            f"train.init_checkpoint={init}",
        ),
        "cp2": ("parallel.context_parallel=2", "parallel.use_distributed_optimizer=false"),
        "pp2_vpp2": (
            "parallel.pipeline_parallel=2",
            "parallel.virtual_pipeline_parallel=2",
            "parallel.use_distributed_optimizer=false",
            f"train.init_checkpoint={init}",
        ),
    }.items():
        trainer = Trainer(
            tiny_config(f"train.max_steps={STEPS}", "train.save_on_exit=false", *extra),
            run_dir=root / name,
            quiet=True,
        )
        if name == "dp2_plain":
            from megatron_longgen.training.checkpointing import save_training_checkpoint

            save_training_checkpoint(
                checkpoints_dir=root / "step0", step=0, cfg=trainer.cfg, model_chunks=trainer.model
            )
        result = trainer.fit()
        out[name] = {
            "losses": result.losses,
            "params": None if name.startswith(("pp2", "cp2")) else _params(trainer),
            "is_logging_rank": trainer.is_logging_rank,
        }
    # TP=2: stop after STEPS (checkpoint), then one more step from it.
    tp_cfg = tiny_config(f"train.max_steps={STEPS + 1}", "parallel.tensor_parallel=2")
    Trainer(tp_cfg, run_dir=root / "tp2", quiet=True).fit(stop_after_steps=STEPS)
    import dataclasses

    no_exit_save = dataclasses.replace(tp_cfg, train=dataclasses.replace(tp_cfg.train, save_on_exit=False))
    out["tp2_next"] = Trainer(no_exit_save, run_dir=root / "tp2", quiet=True).fit(resume=True).losses
    # Distributed optimizer at DP=2: checkpoint after STEPS, then one more step from it (at DP=2 here, at
    # DP=1 in `_one_rank`: the optimizer state is resharded over a different DP size).
    do_cfg = tiny_config(f"train.max_steps={STEPS + 1}", "parallel.use_distributed_optimizer=true")
    Trainer(do_cfg, run_dir=root / "distopt_dp2", quiet=True).fit(stop_after_steps=STEPS)
    do_next = dataclasses.replace(do_cfg, train=dataclasses.replace(do_cfg.train, save_on_exit=False))
    out["distopt_dp2_next"] = (
        Trainer(do_next, run_dir=root / "distopt_dp2", quiet=True).fit(resume=True).losses
    )
    # ... and at TP=2 in the fully reshardable format, resumed at TP=1 in `_one_rank`.
    full_cfg = tiny_config(
        f"train.max_steps={STEPS + 1}",
        "parallel.tensor_parallel=2",
        "parallel.use_distributed_optimizer=true",
        "train.optimizer_checkpoint_format=fully_reshardable",
    )
    Trainer(full_cfg, run_dir=root / "distopt_tp2", quiet=True).fit(stop_after_steps=STEPS)
    full_next = dataclasses.replace(full_cfg, train=dataclasses.replace(full_cfg.train, save_on_exit=False))
    out["distopt_tp2_next"] = (
        Trainer(full_next, run_dir=root / "distopt_tp2", quiet=True).fit(resume=True).losses
    )
    return out


def _one_rank(rank, world_size, root):
    from pathlib import Path

    from megatron_longgen.training.trainer import Trainer

    root = Path(root)
    out = {}
    trainer = Trainer(
        tiny_config(
            f"train.max_steps={STEPS}", "train.save_on_exit=false", "parallel.use_distributed_optimizer=false"
        ),
        run_dir=root / "dp1",
        quiet=True,
    )
    out["dp1"] = {"losses": trainer.fit().losses, "params": _params(trainer)}
    out["metrics"] = [json.loads(line) for line in (root / "dp1" / "metrics.jsonl").read_text().splitlines()]
    # Resharding: the TP=2 checkpoint (step STEPS) resumed at TP=1 gives the step STEPS+1 loss of TP=2.
    cfg = tiny_config(f"train.max_steps={STEPS + 1}", "train.save_on_exit=false")
    out["tp1_from_tp2"] = (
        Trainer(cfg, run_dir=root / "tp2", quiet=True).fit(resume=True, allow_changes=("layout",)).losses
    )
    do_cfg = tiny_config(
        f"train.max_steps={STEPS + 1}", "train.save_on_exit=false", "parallel.use_distributed_optimizer=true"
    )
    out["distopt_dp1_from_dp2"] = (
        Trainer(do_cfg, run_dir=root / "distopt_dp2", quiet=True)
        .fit(resume=True, allow_changes=("layout",))
        .losses
    )
    full_cfg = tiny_config(
        f"train.max_steps={STEPS + 1}",
        "train.save_on_exit=false",
        "parallel.use_distributed_optimizer=true",
        "train.optimizer_checkpoint_format=fully_reshardable",
    )
    out["distopt_tp1_from_tp2"] = (
        Trainer(full_cfg, run_dir=root / "distopt_tp2", quiet=True)
        .fit(resume=True, allow_changes=("layout",))
        .losses
    )
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parallel"))
    two = run_distributed(_two_ranks, world_size=2, args=(root,), timeout_s=400)
    one = run_distributed(_one_rank, world_size=1, args=(root,), timeout_s=300)[0]
    return two, one


def _logged(two, name):
    return next(r[name] for r in two if r[name]["is_logging_rank"])


@pytest.mark.parametrize("name", ["dp2_plain", "dp2_distopt"])
def test_dp2_matches_dp1(results, name):
    two, one = results
    got, ref = _logged(two, name), one["dp1"]
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
    for rank_result in two:  # every DP replica ends with the reference weights
        for key, value in ref["params"].items():
            torch.testing.assert_close(
                torch.from_numpy(rank_result[name]["params"][key]),
                torch.from_numpy(value),
                rtol=1e-4,
                atol=1e-6,
                msg=key,
            )


def test_distributed_optimizer_matches_plain(results):
    two, _ = results
    for rank_result in two:
        for key, value in rank_result["dp2_plain"]["params"].items():
            torch.testing.assert_close(
                torch.from_numpy(rank_result["dp2_distopt"]["params"][key]),
                torch.from_numpy(value),
                rtol=1e-5,
                atol=1e-7,
                msg=key,
            )


@pytest.mark.parametrize("name", ["pp2", "pp2_vpp2", "cp2"])
def test_pipeline_and_context_parallel_match_dp(results, name):
    two, _ = results
    got = _logged(two, name)["losses"]
    ref = _logged(two, "dp2_plain")["losses"]
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_tp2_checkpoint_resumes_at_tp1(results):
    two, one = results
    assert len(two[0]["tp2_next"]) == 1 and len(one["tp1_from_tp2"]) == 1
    torch.testing.assert_close(
        torch.tensor(one["tp1_from_tp2"]), torch.tensor(two[0]["tp2_next"]), rtol=1e-5, atol=1e-6
    )


def test_distributed_optimizer_state_reshards_from_dp2_to_dp1(results):
    # Adam moments and master weights must come back exactly, or the next step's loss moves.
    two, one = results
    assert len(two[0]["distopt_dp2_next"]) == 1 and len(one["distopt_dp1_from_dp2"]) == 1
    torch.testing.assert_close(
        torch.tensor(one["distopt_dp1_from_dp2"]),
        torch.tensor(two[0]["distopt_dp2_next"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_fully_reshardable_optimizer_state_moves_from_tp2_to_tp1(results):
    two, one = results
    torch.testing.assert_close(
        torch.tensor(one["distopt_tp1_from_tp2"]),
        torch.tensor(two[0]["distopt_tp2_next"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_metrics_lines_have_throughput_fields(results):
    _, one = results
    lines = one["metrics"]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tokens_per_s_per_gpu",
        "step_time_s",
        "wall_clock_s",
        "productive_s",
        "eval_time_s",
        "checkpoint_time_s",
        "peak_mem_gib",
        "tflops_per_gpu",
        "tflops_per_gpu_dense_equiv",
    ):
        assert key in lines[-1], key
    # SFFS with 16-token blocks at 128 tokens: the sparse layers skip pairs, so executed < dense-equivalent.
    assert lines[-1]["tflops_per_gpu"] < lines[-1]["tflops_per_gpu_dense_equiv"]
    assert lines[-1]["tokens_per_s"] == pytest.approx(4 * 128 / lines[-1]["step_time_s"])
