"""TP=2 equals TP=1 in loss and gradients (2 gloo processes), for the hybrid LongGen model.

The vocabulary (128) needs no padding at TP=1 or TP=2, so both layouts hold exactly the same rows.
The TP=1 weights are saved with Megatron's dist_checkpointing and loaded at TP=2 (exercising resharding).
To compare gradients across layouts, the TP=2 gradients are written into the parameters, saved the same
way, and loaded back at TP=1, where they line up name by name with the TP=1 gradients.
"""

import pytest
import torch

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

SEQ = 48


def _cfg(tp: int, sequence_parallel: bool = False):
    from megatron_longgen.config import (
        LongGenConfig,
        ModelConfig,
        ParallelConfig,
        SparseAttentionConfig,
        TrainingConfig,
    )

    return LongGenConfig(
        name="tp",
        model=ModelConfig(
            num_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=64,
            vocab_size=128,
            make_vocab_size_divisible_by=64,
            layer_pattern="SFS",
        ),
        sparse=SparseAttentionConfig(block_size=4, num_window_blocks=2, backend="torch"),
        parallel=ParallelConfig(
            tensor_parallel=tp, sequence_parallel=sequence_parallel, use_distributed_optimizer=False
        ),
        train=TrainingConfig(seq_length=SEQ, max_steps=1, dtype="fp32"),
    )


def _model(cfg, seed):
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    initialize_model_parallel(cfg)
    set_seed(seed)
    return build_model(cfg)


def _loss_and_backward(model):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 100, (2, SEQ), generator=g)
    pos = torch.arange(SEQ)[None].expand(2, -1)
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    return loss.item()


def _worker(rank, world_size, tmp):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    results = {}
    # 1) Reference at TP=1 (both ranks hold the full model: DP=2).
    ref = _model(_cfg(1), seed=11)
    results["loss_tp1"] = _loss_and_backward(ref)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    results["num_params_tp1"] = sum(p.numel() for p in ref.parameters())
    dist_checkpointing.save(ref.sharded_state_dict(), f"{tmp}/weights")
    dist.barrier()

    for sp in (False, True):
        tag = "sp" if sp else "tp"
        # 2) TP=2 (optionally with sequence parallelism) from the same weights.
        model = _model(_cfg(2, sequence_parallel=sp), seed=99)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/weights"))
        results[f"loss_{tag}2"] = _loss_and_backward(model)
        results[f"num_local_params_{tag}2"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            for p in model.parameters():
                if sp and getattr(p, "sequence_parallel", False):
                    # Norm weights see only their sequence shard under SP; Megatron all-reduces them in
                    # finalize_model_grads. Do the same here.
                    dist.all_reduce(p.grad)
                p.copy_(p.grad)
        dist_checkpointing.save(model.sharded_state_dict(), f"{tmp}/grads_{tag}")
        dist.barrier()

        # 3) Back at TP=1: load the TP=2 gradients as weights and compare with the TP=1 gradients.
        back = _model(_cfg(1), seed=5)
        back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), f"{tmp}/grads_{tag}"))
        diffs = {n: (p.detach() - ref_grads[n]).abs().max().item() for n, p in back.named_parameters()}
        scale = {n: ref_grads[n].abs().max().item() for n in ref_grads}
        results[f"grad_diffs_{tag}"] = diffs
        results[f"grad_scale_{tag}"] = scale
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    for sub in ("weights", "grads_tp", "grads_sp"):
        (tmp / sub).mkdir()
    return run_distributed(_worker, world_size=2, args=(str(tmp),), timeout_s=300)


def test_tp2_loss_equals_tp1(results):
    for r in results:
        assert r["loss_tp2"] == pytest.approx(r["loss_tp1"], rel=1e-6, abs=1e-6)


def test_tp2_model_is_really_sharded(results):
    # Each TP rank holds about half the parameters (only the small norms are replicated).
    one = results[0]
    assert one["num_local_params_tp2"] < 0.55 * one["num_params_tp1"]


@pytest.mark.parametrize("tag", ["tp", "sp"])
def test_tp2_gradients_equal_tp1(results, tag):
    diffs, scale = results[0][f"grad_diffs_{tag}"], results[0][f"grad_scale_{tag}"]
    assert len(diffs) >= 3 * 6  # every layer's weights were compared
    bad = {n: d for n, d in diffs.items() if d > 1e-5 * max(scale[n], 1e-3)}
    assert not bad, f"TP=2 gradients differ from TP=1: {bad}"


def test_sequence_parallel_loss_equals_tp1(results):
    for r in results:
        assert r["loss_sp2"] == pytest.approx(r["loss_tp1"], rel=1e-6, abs=1e-6)
