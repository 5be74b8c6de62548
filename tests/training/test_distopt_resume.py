"""The distributed optimizer resumes exactly: on two gloo ranks (DP=2, the optimizer state sharded over
them), 3 steps + checkpoint + resume + 3 steps give the losses and final weights of 6 uninterrupted steps,
bit for bit, in both optimizer checkpoint formats. The oracle is the uninterrupted run itself.

Resuming changes nothing at step 4 (its loss depends on the loaded weights only); Adam's step count enters
the update of step 4, so the losses of steps 5 and 6 and the final weights are what catch a wrong count.
Workers start once per module; the tests assert on what they return."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

FORMATS = ("dp_reshardable", "fully_reshardable")
STOP, STEPS = 3, 6


def _worker(rank, world_size, root):
    from pathlib import Path

    from megatron_longgen.training.trainer import Trainer

    def params(trainer) -> dict:
        module = trainer.model[0].module
        return {name: p.detach().float().numpy().copy() for name, p in module.named_parameters()}

    def adam_steps(trainer) -> list[tuple[int, float]]:
        """(id, value) of every per-parameter `step` tensor of the inner torch Adam."""
        out = []
        for chained in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            for state in chained.optimizer.state.values():
                out.append((id(state["step"]), float(state["step"])))
        return out

    out = {}
    for fmt in FORMATS:
        overrides = (f"train.max_steps={STEPS}", "parallel.use_distributed_optimizer=true",
                     f"train.optimizer_checkpoint_format={fmt}", "train.save_on_exit=true")  # fmt: skip
        straight = Trainer(tiny_config(*overrides), run_dir=Path(root) / f"{fmt}_straight", quiet=True)
        losses = straight.fit().losses
        Trainer(tiny_config(*overrides), run_dir=Path(root) / fmt, quiet=True).fit(stop_after_steps=STOP)
        resumed = Trainer(tiny_config(*overrides), run_dir=Path(root) / fmt, quiet=True)
        resumed_losses = resumed.fit(resume=True).losses
        out[fmt] = {
            "losses": losses, "resumed_losses": resumed_losses, "params": params(straight),
            "resumed_params": params(resumed), "steps": adam_steps(straight), "resumed_steps": adam_steps(resumed),
        }  # fmt: skip
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(
        _worker, world_size=2, args=(str(tmp_path_factory.mktemp("distopt")),), timeout_s=500
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_resumed_losses_equal_the_uninterrupted_run(results, fmt):
    logging_ranks = [rank for rank in results if rank[fmt]["losses"]]  # losses come back on the logging rank
    assert len(logging_ranks) == 1
    for rank in logging_ranks:
        r = rank[fmt]
        assert len(r["losses"]) == STEPS and len(r["resumed_losses"]) == STEPS - STOP
        assert r["resumed_losses"] == r["losses"][STOP:], (r["losses"], r["resumed_losses"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_resumed_weights_equal_the_uninterrupted_run(results, fmt):
    for rank in results:
        r = rank[fmt]
        assert set(r["params"]) == set(r["resumed_params"])
        for name, value in r["params"].items():
            np.testing.assert_array_equal(r["resumed_params"][name], value, err_msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_parameter_counts_its_own_adam_steps(results, fmt):
    # One step tensor per parameter (a shared one grows by the number of parameters per step), holding the
    # number of steps taken, in the uninterrupted and in the resumed run alike.
    for rank in results:
        for key in ("steps", "resumed_steps"):
            steps = rank[fmt][key]
            assert len(steps) > 1
            assert len({i for i, _ in steps}) == len(steps), f"{key}: parameters share a step tensor"
            assert {v for _, v in steps} == {float(STEPS)}, key
