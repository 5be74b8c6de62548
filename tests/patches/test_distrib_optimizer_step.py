"""The fully_reshardable step patch (patches/distrib_optimizer_step.py): loading a `fully_reshardable`
DistributedOptimizer checkpoint into torch's Adam fails upstream with KeyError 'step'; with the patch the
loaded moments equal the saved ones and each parameter's step survives; the patch is undone after its
block and refuses untested Megatron-Core versions."""

import pytest
import torch

import megatron_longgen.patches._base as base
from megatron_longgen.patches import distrib_optimizer_step as patch
from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

SEQ, VOCAB = 32, 128
FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_and_optimizer(seed: int):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_longgen.compat.mcore import wrap_in_ddp
    from megatron_longgen.megatron_bridge import to_transformer_config
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    cfg = tiny_config("parallel.use_distributed_optimizer=true", f"train.seq_length={SEQ}", pattern="F")
    initialize_model_parallel(cfg)
    set_seed(seed)
    tcfg = to_transformer_config(cfg)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = wrap_in_ddp([build_model(cfg, transformer_config=tcfg)], config=tcfg, ddp_config=ddp_cfg)[0]
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [model]
    )
    return model, opt


def _adam_states(opt) -> dict:
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    return {
        (g, i): {k: v.clone() for k, v in inner.state[p].items()}
        for g, group in enumerate(inner.param_groups)
        for i, p in enumerate(group["params"])
    }


def _fresh_adam_state(opt) -> None:
    """A never-stepped torch Adam has no state; Megatron's load request needs the keys (like the trainer)."""
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            inner.state[p].update(
                step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
            )


def _load(opt, model, ckpt) -> None:
    from megatron.core import dist_checkpointing

    request = opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=FORMAT)
    with torch.no_grad():
        opt.load_state_dict(dist_checkpointing.load(request, ckpt))


def _worker(rank, world_size, ckpt):
    from megatron.core import dist_checkpointing

    model, opt = _model_and_optimizer(seed=0)
    for step in range(2):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(step))
        model.zero_grad_buffer()
        opt.zero_grad()
        model(ids, torch.arange(SEQ)[None].expand(2, -1), None, labels=ids).float().mean().backward()
        model.finish_grad_sync()
        opt.step()
    saved = _adam_states(opt)
    dist_checkpointing.save(opt.sharded_state_dict(model.sharded_state_dict(), metadata=FORMAT), ckpt)

    out = {}
    model2, opt2 = _model_and_optimizer(seed=1)
    _fresh_adam_state(opt2)
    try:
        _load(opt2, model2, ckpt)
        out["without"] = "loaded"
    except KeyError as err:
        out["without"] = f"KeyError {err}"
    model3, opt3 = _model_and_optimizer(seed=2)
    _fresh_adam_state(opt3)
    original = base.unwrap(_target())
    with patch.fully_reshardable_step():
        out["wrapped_inside"] = _target() is not original and base.unwrap(_target()) is original
        _load(opt3, model3, ckpt)
    out["restored_after"] = _target() is original
    loaded = _adam_states(opt3)
    out["max_diff"] = {
        key: max((loaded[key][k] - saved[key][k]).abs().max().item() for k in saved[key]) for key in saved
    }
    out["steps"] = sorted({float(v["step"]) for v in loaded.values()})
    return out


def _target():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return DistributedOptimizer._set_main_param_and_optimizer_states


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("optim")
    return run_distributed(_worker, world_size=1, args=(str(ckpt),), timeout_s=300)[0]


def test_upstream_fails_without_the_patch(results):
    assert results["without"] == "KeyError 'step'"


def test_with_the_patch_state_and_step_are_restored(results):
    assert results["wrapped_inside"] and results["restored_after"]
    assert results["max_diff"] and max(results["max_diff"].values()) == 0.0
    assert results["steps"] == [2.0]  # two optimizer steps were taken before saving


def test_untested_version_is_refused(monkeypatch):
    monkeypatch.setattr(base, "installed_version", lambda package: "0.17.0")
    with pytest.raises(base.UntestedVersionError, match="0.17.0"), patch.fully_reshardable_step():
        pass
